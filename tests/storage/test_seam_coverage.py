"""No byte reaches or leaves the disk in storage without passing the seam it was given.

The check runs in a subprocess (tests/storage/seam_audit.py) because it installs an audit hook,
which stays for the life of the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_file_access_of_storage_goes_through_the_given_seam(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.storage.seam_audit", str(tmp_path)],
                          cwd=ROOT, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["violations"] == []
    checked = result["checked"]
    # The workload really touched the disk in every way storage does.
    for event in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.listdir",
                  "fcntl.flock", "os.truncate"):
        assert checked.get(event, 0) > 0, f"no {event} event was audited: {checked}"
    assert sum(checked.values()) > 100 and result["seam_calls"] > 300
    # And the audit does catch a bypass and a forgotten file_io.
    assert len(result["control_bypass"]) == 1 and "not through the seam" in \
        result["control_bypass"][0]
    assert result["control_default"] and all("default seam" in v
                                             for v in result["control_default"])

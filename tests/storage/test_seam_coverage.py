"""No byte reaches or leaves the disk in storage without passing the seam it was given.

The checks run in subprocesses (tests/storage/seam_audit.py for the data directory,
tests/storage/seam_audit_exchange.py for the snapshot exchange) because they install an audit
hook, which stays for the life of the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _audit(module: str, base: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", module, str(base)],
                          cwd=ROOT, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_every_file_access_of_storage_goes_through_the_given_seam(tmp_path: Path) -> None:
    result = _audit("tests.storage.seam_audit", tmp_path)
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


def test_every_file_access_of_the_snapshot_exchange_goes_through_the_given_seam(
        tmp_path: Path) -> None:
    result = _audit("tests.storage.seam_audit_exchange", tmp_path)
    assert result["violations"] == []
    checked = result["checked"]
    # Spools and .fsm files were created, opened, renamed and removed, the directory made.
    for event in ("open", "os.rename", "os.remove", "os.mkdir"):
        assert checked.get(event, 0) > 0, f"no {event} event was audited: {checked}"
    # Writing, fsyncing and reading (no audit event of their own) went through the seam too.
    assert {"write", "fsync", "readinto", "pread", "replace", "unlink", "close"} <= set(
        result["ops"])
    assert result["seam_calls"] > 50
    # The audit catches the exchange's former bypass and an exchange on the default seam.
    assert len(result["control_bypass"]) == 2 and all(
        "not through the seam" in v for v in result["control_bypass"])
    assert result["control_default"] and all("default seam" in v
                                             for v in result["control_default"])

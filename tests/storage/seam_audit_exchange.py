"""Subprocess of test_seam_coverage: the snapshot exchange touches the disk only through the seam.

Usage, from the repository root: ``python -m tests.storage.seam_audit_exchange BASE_DIR``.

The same audit hook as :mod:`tests.storage.seam_audit` (a process of its own, since hooks cannot
be removed), over everything a :class:`SnapshotExchange` does with files: receiving (create the
directory, spool, finalize, refuse, abort before and after finalizing, a second transfer of the
same index) and sending (open a payload, read it to the end, a damaged one). It prints one JSON
object: the events checked, the violations, the seam calls, and control runs where a bypass (a
spool made with :mod:`tempfile`) and an exchange built without ``file_io`` (so on the default
seam) must be caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
from typing import Any

import crc32c

from trio_raft.errors import RaftError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.recovery import SPOOL_PREFIX
from trio_raft.storage.snapshot_exchange import SnapshotExchange
from trio_raft.testing.faults import FaultyFileIO

from .seam_audit import Audit


def _fsm_file(directory: str, index: int, payload: bytes) -> bytes:
    """A ``.fsm`` file written outside the audit (it stands for one written by storage)."""
    crc = crc32c.crc32c(payload)
    with open(fsm.fsm_snapshot_path(directory, index), "wb") as f:
        f.write(payload + struct.pack(">I", crc))
    return fsm.encode_snapshot_token(index, crc)


def workload(base: str, fio: FaultyFileIO, audit: Audit) -> None:
    applied = [0]
    fsm_dir = os.path.join(base, "node", "fsm-snap")
    ex = SnapshotExchange(fsm_dir, lambda: applied[0], file_io=fio)
    # Receive: the directory is created, a payload lands, a retry of the same content is kept.
    first = ex.begin_incoming(7)
    first.write(b"payload " * 1000)
    first.finalize(crc32c.crc32c(b"payload " * 1000))
    again = ex.begin_incoming(7)
    again.write(b"payload " * 1000)
    again.finalize()
    # Refusals: a CRC the sender did not announce, a stale index, a payload over the cap.
    bad = ex.begin_incoming(8)
    bad.write(b"x")
    with contextlib.suppress(RaftError):
        bad.finalize(1)
    bad.abort()
    stale = ex.begin_incoming(9)
    applied[0] = 9
    with contextlib.suppress(RaftError):
        stale.finalize()
    stale.abort()
    small = SnapshotExchange(fsm_dir, lambda: applied[0], file_io=fio, max_bytes=4)
    big = small.begin_incoming(10)
    with contextlib.suppress(RaftError):
        big.write(b"too large")
    big.abort()
    # Aborts after finalizing: the engine refused the message (the file goes).
    refused = ex.begin_incoming(11)
    refused.write(b"refused")
    refused.finalize()
    refused.abort()
    again.abort()
    first.abort()
    # Send: a sound payload read to the end, a missing one, a damaged one.
    audit.watching = False
    token = _fsm_file(fsm_dir, 20, os.urandom(5000))
    damaged = _fsm_file(fsm_dir, 21, b"damaged payload")
    with open(fsm.fsm_snapshot_path(fsm_dir, 21), "r+b") as f:
        f.write(b"D")
    audit.watching = True
    out = ex.open_outgoing(token)
    assert out is not None
    with out:
        while out.read(1024):
            pass
    with contextlib.suppress(RaftError):
        ex.open_outgoing(fsm.encode_snapshot_token(22, 0))
    out = ex.open_outgoing(damaged)
    assert out is not None
    with out, contextlib.suppress(RaftError):
        out.read(1 << 20)


def main() -> None:
    base = os.path.realpath(sys.argv[1])
    audit = Audit(base)
    sys.addaudithook(audit.hook)
    fio = FaultyFileIO()
    audit.watching = True
    workload(base, fio, audit)
    result: dict[str, Any] = {"checked": audit.checked, "violations": audit.violations,
                              "seam_calls": len(fio.calls),
                              "ops": sorted({c.op for c in fio.calls})}
    # Controls: a spool made with tempfile (what the exchange once did) and an exchange on the
    # default seam must both be caught, or the audit proves nothing.
    audit.violations = []
    fd, path = tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=os.path.join(base, "node", "fsm-snap"))
    os.close(fd)
    os.unlink(path)
    result["control_bypass"] = audit.violations
    audit.violations = []
    default = SnapshotExchange(os.path.join(base, "node", "fsm-snap"), lambda: 0)
    default.begin_incoming(30).abort()
    result["control_default"] = audit.violations
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Subprocess of test_seam_coverage: proves that storage touches the disk only through the seam.

Usage, from the repository root: ``python -m tests.storage.seam_audit BASE_DIR``.

It installs a :func:`sys.addaudithook` hook (hooks cannot be removed, hence a process of its
own), then drives every storage entry point on files under ``BASE_DIR`` with a
:class:`FaultyFileIO` that injects nothing. For each audited file-system event on a path under
``BASE_DIR`` (or on a bare descriptor) the hook checks that the Python function raising it is in
``trio_raft/storage/fileio.py`` (the real seam) *and* that the FaultyFileIO is on the stack
(the seam that was passed in was used, not a default). It prints one JSON object: the events
checked, the violations, and a control run where a deliberate bypass must be caught.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from types import FrameType
from typing import Any

from trio_raft.core.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import open_disk_state
from trio_raft.storage.migrate import migrate_fsm_store
from trio_raft.storage.peers import PersistedPeer, load_persisted_peers, save_persisted_peers
from trio_raft.testing.faults import FaultyFileIO

from .helpers import KV

EVENTS = frozenset({
    "open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.listdir", "os.scandir",
    "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "os.utime",
    "shutil.rmtree", "shutil.copyfile", "shutil.move", "fcntl.flock", "fcntl.lockf",
})
SEAM = os.path.join("trio_raft", "storage", "fileio.py")
FAULTS = os.path.join("trio_raft", "testing", "faults.py")
P1 = PersistedPeer(11, "n1", "h:1")
P2 = PersistedPeer(22, "n2", "h:2")


class Audit:
    def __init__(self, base: str) -> None:
        self.base = base
        self.watching = False
        self.checked: dict[str, int] = {}
        self.violations: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.watching or event not in EVENTS:
            return
        target = args[0] if args else None
        if (isinstance(target, str | bytes | os.PathLike)
                and not os.fsdecode(target).startswith(self.base)):
            return
        caller: FrameType | None = sys._getframe(1)
        where = f"{caller.f_code.co_filename}:{caller.f_lineno}" if caller else "?"
        self.checked[event] = self.checked.get(event, 0) + 1
        if caller is None or not caller.f_code.co_filename.endswith(SEAM):
            self.violations.append(f"{event} {target!r} from {where}: not through the seam")
            return
        frame: FrameType | None = caller
        while frame is not None and not frame.f_code.co_filename.endswith(FAULTS):
            frame = frame.f_back
        if frame is None:
            self.violations.append(f"{event} {target!r} from {where}: the default seam was "
                                   "used instead of the one passed in")


def workload(base: str, fio: FaultyFileIO, audit: Audit) -> None:
    data = os.path.join(base, "data")
    kv = KV({"init": "1"})
    ds = open_disk_state(data, [P1], False, kv, segment_size=300, max_wal_files=1, file_io=fio)
    p = ds.persistence
    for i in range(2, 12):
        p.save_ready(HardState(1, 11, i), [Entry(1, i, data=b"k%d=v" % i)], None, True)
        kv.apply(b"k%d=v" % i)
    assert p.try_save_state(HardState(1, 11, 11)) in (True, False)
    token = p.write_fsm_snapshot(kv.snapshot(), 11)
    snap = p.save_local_snapshot(11, 1, ConfState([11]), token)
    p.purge()
    p.write_current_peers(11, [P1, P2])
    p.restore_snapshot_state(KV(), snap)
    reader, _, _ = p.open_fsm_payload(11)
    with reader:
        reader.read()
    p.read_fsm_payload(11)
    crc = fsm.write_fsm_snapshot_file(KV({"leader": "x"}).snapshot(), p.fsm_dir, 30,
                                      file_io=p.file_io)
    received = Snapshot(SnapshotMetadata(ConfState([11]), 30, 2),
                        fsm.encode_snapshot_token(30, crc))
    p.save_ready(HardState(2, 0, 30), [Entry(2, 31)], received, True)
    p.close()
    # Damage the newest segment's tail (outside the audit) so the restart repairs it.
    audit.watching = False
    last = sorted(n for n in os.listdir(os.path.join(data, "wal")) if n.endswith(".wal"))[-1]
    with open(os.path.join(data, "wal", last), "ab") as f:
        f.write(b"\0" * 40)
    os.makedirs(os.path.join(data, "trio-raft-snapshot-stale", "sub"))
    store = os.path.join(base, "store")
    os.mkdir(store)
    with open(os.path.join(store, "fsm-snapshot.bin"), "wb") as f:
        f.write(b'{"migrated": "yes"}')
    audit.watching = True
    ds = open_disk_state(data, [P1], False, KV(), file_io=fio)  # restart: repair, cleanup
    ds.persistence.close()
    save_persisted_peers(data, 40, [P1, P2], file_io=fio)
    load_persisted_peers(data, file_io=fio)
    join = open_disk_state(os.path.join(base, "joiner"), [P1, P2], False, KV(), file_io=fio)
    join.persistence.close()
    migrate_fsm_store(store, os.path.join(base, "migrated"), [P1], file_io=fio)


def main() -> None:
    base = os.path.realpath(sys.argv[1])
    audit = Audit(base)
    sys.addaudithook(audit.hook)
    fio = FaultyFileIO()
    audit.watching = True
    workload(base, fio, audit)
    result: dict[str, Any] = {"checked": audit.checked, "violations": audit.violations,
                              "seam_calls": len(fio.calls)}
    # Controls: a bypass and a forgotten file_io must both be caught, or the audit proves
    # nothing.
    audit.violations = []
    fd, _ = tempfile.mkstemp(dir=base)
    os.close(fd)
    result["control_bypass"] = audit.violations
    audit.violations = []
    load_persisted_peers(os.path.join(base, "data"))  # no file_io: the default seam
    result["control_default"] = audit.violations
    print(json.dumps(result))


if __name__ == "__main__":
    main()

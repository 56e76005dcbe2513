"""The file-I/O seam (OSFileIO), the helpers built on it, and FaultyFileIO's rules."""

from __future__ import annotations

import errno
import os

import pytest

from trio_raft.errors import StorageError, StorageIOError
from trio_raft.storage import fileutil
from trio_raft.storage.fileio import OPS, OS_FILE_IO, OSFileIO
from trio_raft.testing.faults import Fault, FaultyFileIO


def test_os_file_io_primitives(tmp_path) -> None:
    fio = OS_FILE_IO
    path = str(tmp_path / "f")
    fd = fio.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert fio.write(fd, b"hello world") == 11
        fio.fsync(fd)
        fio.fdatasync(fd)
        assert fio.pread(fd, 5, 6) == b"world"
        assert fio.fstat(fd).st_size == 11
        fio.ftruncate(fd, 5)
        assert fio.fstat(fd).st_size == 5
    finally:
        fio.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o600
    fd = fio.open(path, os.O_RDONLY)
    try:
        buf = bytearray(16)
        assert fio.readinto(fd, buf) == 5 and buf[:5] == b"hello"
        assert fio.readinto(fd, buf) == 0
    finally:
        fio.close(fd)
    fio.mkdir(str(tmp_path / "d"))
    assert sorted(fio.listdir(str(tmp_path))) == ["d", "f"]
    fio.replace(path, str(tmp_path / "d" / "g"))
    assert fio.stat(str(tmp_path / "d" / "g")).st_size == 5
    with pytest.raises(FileExistsError):
        fio.rename_noreplace(str(tmp_path / "d" / "g"), str(tmp_path / "d" / "g"))
    fio.rename_noreplace(str(tmp_path / "d" / "g"), str(tmp_path / "h"))
    fio.unlink(str(tmp_path / "h"))
    fio.rmdir(str(tmp_path / "d"))
    assert fio.listdir(str(tmp_path)) == []


def test_flock_is_exclusive_between_open_files(tmp_path) -> None:
    path = str(tmp_path / "LOCK")
    a = OS_FILE_IO.open(path, os.O_RDWR | os.O_CREAT)
    b = OS_FILE_IO.open(path, os.O_RDWR)
    try:
        OS_FILE_IO.flock(a)
        with pytest.raises(BlockingIOError):
            OS_FILE_IO.flock(b)
    finally:
        OS_FILE_IO.close(a)
    try:
        OS_FILE_IO.flock(b)  # released with its open file
    finally:
        OS_FILE_IO.close(b)


def test_write_all_completes_short_writes(tmp_path) -> None:
    fio = FaultyFileIO([Fault("write", short_write=3, repeat=True)])
    path = str(tmp_path / "f")
    fd = fio.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        fileutil.write_all(fd, b"0123456789", file_io=fio)
    finally:
        fio.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
    assert [c.nbytes for c in fio.calls_to("write")] == [10, 7, 4, 1]


def test_write_all_refuses_a_write_that_makes_no_progress(tmp_path) -> None:
    class Stuck(OSFileIO):
        def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
            return 0

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="no progress") as info:
            fileutil.write_all(fd, b"abc", file_io=Stuck())
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_storage_io_error_names_file_operation_and_errno() -> None:
    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    err = StorageIOError.from_os_error("write", "/data/x", cause, "wal")
    assert isinstance(err, StorageError)
    assert (err.op, err.path, err.errno) == ("write", "/data/x", errno.ENOSPC)
    assert str(err) == "wal: write /data/x failed: No space left on device (errno 28)"


@pytest.mark.parametrize(("fault", "op"), [
    (Fault("open", path=".tmp-"), "create"),
    (Fault("write", path=".tmp-", error=errno.ENOSPC), "write"),
    (Fault("write", path=".tmp-", short_write=2), None),  # completed: not a failure
    (Fault("fsync", path=".tmp-"), "fsync"),
    (Fault("close", path=".tmp-"), "close"),
    (Fault("replace"), "rename"),
])
def test_replace_file_failure_leaves_the_previous_file(tmp_path, fault: Fault,
                                                       op: str | None) -> None:
    path = tmp_path / "state.bin"
    fileutil.replace_file(path, b"old content")
    fio = FaultyFileIO([fault])
    if op is None:
        fileutil.replace_file(path, b"new content", file_io=fio)
        assert path.read_bytes() == b"new content"
        return
    with pytest.raises(StorageIOError) as info:
        fileutil.replace_file(path, b"new content", file_io=fio)
    err = info.value
    assert err.op == op and str(tmp_path) in err.path and err.errno == fault.error
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == fault.error
    assert path.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["state.bin"]  # the temporary file is gone


def test_replace_file_reports_a_failed_directory_fsync(tmp_path) -> None:
    path = tmp_path / "state.bin"
    fio = FaultyFileIO([Fault("fsync", path=f"*{os.sep}{tmp_path.name}")])
    with pytest.raises(StorageIOError) as info:
        fileutil.replace_file(path, b"new", file_io=fio)
    assert info.value.op == "fsync" and info.value.path == str(tmp_path)
    # The rename had happened: the new content is there, but its durability is unknown.
    assert path.read_bytes() == b"new"


def test_make_dirs_fsyncs_each_new_parent(tmp_path) -> None:
    fio = FaultyFileIO()
    fileutil.make_dirs(tmp_path / "a" / "b", file_io=fio)
    assert (tmp_path / "a" / "b").is_dir()
    assert [c.path for c in fio.calls_to("mkdir")] == [str(tmp_path / "a"),
                                                       str(tmp_path / "a" / "b")]
    fsynced = [c.path for c in fio.calls_to("fsync")]
    assert fsynced == [str(tmp_path), str(tmp_path / "a")]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageIOError, match="not a directory"):
        fileutil.make_dirs(tmp_path / "file")


def test_remove_tree_never_follows_symlinks(tmp_path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_bytes(b"x")
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "f").write_bytes(b"y")
    os.symlink(keep, victim / "link")
    fileutil.remove_tree(str(victim))
    fileutil.remove_tree(str(victim))  # missing is fine
    assert not victim.exists() and (keep / "precious").read_bytes() == b"x"


def test_read_file_and_missing_files(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert fileutil.read_file(str(tmp_path / "f")) == b"abc" * 1000
    assert fileutil.read_file_if_exists(str(tmp_path / "nope")) is None
    with pytest.raises(StorageIOError) as info:
        fileutil.read_file(str(tmp_path / "nope"))
    assert info.value.errno == errno.ENOENT
    fio = FaultyFileIO([Fault("readinto", path="f")])
    with pytest.raises(StorageIOError) as info:
        fileutil.read_file(str(tmp_path / "f"), file_io=fio)
    assert info.value.op == "read" and info.value.errno == errno.EIO
    assert len(fio.calls_to("close")) == 1  # the descriptor was released


def test_fault_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown file-I/O operation"):
        Fault("fwrite")
    with pytest.raises(ValueError, match="at least one operation"):
        Fault(())
    with pytest.raises(ValueError, match="'write' operation only"):
        Fault("fsync", short_write=3)
    with pytest.raises(ValueError, match="at least 1 byte"):
        Fault("write", short_write=0)
    with pytest.raises(ValueError):
        Fault("write", after=-1)
    assert Fault(("fsync", "fdatasync")).ops == frozenset({"fsync", "fdatasync"})
    assert frozenset(OPS) >= {"open", "write", "fsync", "fdatasync", "replace", "flock"}


def test_fault_after_once_and_repeat(tmp_path) -> None:
    once = Fault("mkdir", after=1)
    fio = FaultyFileIO([once])
    fio.mkdir(str(tmp_path / "a"))  # the first matching call passes
    with pytest.raises(OSError) as info:
        fio.mkdir(str(tmp_path / "b"))
    assert info.value.errno == errno.EIO and info.value.filename == str(tmp_path / "b")
    fio.mkdir(str(tmp_path / "c"))  # fired once: through again
    assert sorted(os.listdir(tmp_path)) == ["a", "c"]
    assert [c.path for c in fio.fired(once)] == [str(tmp_path / "b")]

    always = fio.add(Fault("unlink", error=errno.EROFS, repeat=True))
    for name in ("x", "y"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(OSError) as info:
            fio.unlink(str(tmp_path / name))
        assert info.value.errno == errno.EROFS
    assert len(fio.fired(always)) == 2
    fio.clear()
    fio.unlink(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_fault_paths_substring_glob_descriptors_and_renames(tmp_path) -> None:
    wal = tmp_path / "wal"
    wal.mkdir()
    fio = FaultyFileIO([Fault("fsync", path="*.wal"), Fault("fsync", path="*/wal"),
                        Fault("replace", path="final", error=errno.EXDEV)])
    seg = fio.open(str(wal / "0.wal"), os.O_WRONLY | os.O_CREAT)
    tmp = fio.open(str(wal / "0.wal.tmp"), os.O_WRONLY | os.O_CREAT)
    d = fio.open(str(wal), os.O_RDONLY)
    try:
        fio.fsync(tmp)  # "*.wal" does not match the .tmp name: through
        with pytest.raises(OSError):
            fio.fsync(seg)  # the descriptor's path matches the glob
        with pytest.raises(OSError):
            fio.fsync(d)  # the directory itself
    finally:
        for fd in (seg, tmp, d):
            fio.close(fd)
    with pytest.raises(OSError) as info:  # either path of a rename counts
        fio.replace(str(wal / "0.wal.tmp"), str(tmp_path / "final"))
    assert info.value.errno == errno.EXDEV
    (call,) = fio.calls_to("replace")
    assert (call.path, call.target) == (str(wal / "0.wal.tmp"), str(tmp_path / "final"))
    assert call.fault is not None and call.fault.error == errno.EXDEV
    assert [c.path for c in fio.calls_to("fsync")] == [str(wal / "0.wal.tmp"),
                                                       str(wal / "0.wal"), str(wal)]


def test_injected_errno_gives_the_matching_oserror_subclass(tmp_path) -> None:
    fio = FaultyFileIO([Fault("rename_noreplace", error=errno.EEXIST),
                        Fault("open", error=errno.ENOENT)])
    with pytest.raises(FileExistsError):
        fio.rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError):
        fio.open(str(tmp_path / "a"), os.O_RDONLY)


def test_a_failed_close_still_releases_the_descriptor(tmp_path) -> None:
    fio = FaultyFileIO([Fault("close")])
    fd = fio.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        fio.close(fd)
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF

"""Reading ahead on a helper thread (trio_raft/storage/readahead.py) and the sealed restore that
uses it (trio_raft/envelope/stream.py): blocks come in order, an error surfaces at its own
block, memory stays bounded, and no helper outlives its reader, on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import crc32c
import pytest

from trio_raft.envelope import Cipher
from trio_raft.envelope import stream as sealed_stream
from trio_raft.errors import SealedSnapshotIntegrityError, StorageIOError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.readahead import BlockReadAhead

from .helpers import BytesSnapshot


def helpers_alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


class Source:
    """Fills block ``i`` with byte ``i``; raises ``error`` at block ``fail_at``."""

    def __init__(self, fail_at: int = -1, error: BaseException | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.error = error

    def __call__(self, view: memoryview) -> None:
        i = self.calls
        self.calls += 1
        if i == self.fail_at:
            assert self.error is not None
            raise self.error
        view[:] = bytes([i]) * len(view)


def test_blocks_come_in_order_with_the_last_one_short() -> None:
    src = Source()
    ahead = BlockReadAhead(src, 5, 8, 3, name="ra-order")
    got = [bytes(ahead.next()) for _ in range(5)]
    assert got == [bytes([i]) * 8 for i in range(4)] + [b"\x04" * 3]
    with pytest.raises(EOFError):
        ahead.next()
    ahead.close()
    assert not helpers_alive("ra-order")
    with pytest.raises(ValueError):
        ahead.next()
    with pytest.raises(ValueError):
        BlockReadAhead(src, 0, 8, 8)
    with pytest.raises(ValueError):
        BlockReadAhead(src, 2, 8, 9)


def test_an_error_surfaces_at_its_own_block() -> None:
    err = StorageIOError("read failed")
    ahead = BlockReadAhead(Source(fail_at=2, error=err), 6, 4, 4, name="ra-error")
    assert bytes(ahead.next()) == b"\x00" * 4
    assert bytes(ahead.next()) == b"\x01" * 4
    with pytest.raises(StorageIOError) as info:
        ahead.next()
    assert info.value is err
    with pytest.raises(EOFError):  # the helper stopped at the error: nothing more comes
        ahead.next()
    ahead.close()
    assert not helpers_alive("ra-error")


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_reading_ahead_is_bounded_and_close_stops_the_helper(depth: int) -> None:
    # The consumer holds one block and never asks for more: the helper reads at most
    # ``depth`` blocks ahead (depth + 1 buffers in all), then waits; close() wakes it and
    # waits for it.
    src = Source()
    ahead = BlockReadAhead(src, 100, 16, 16, depth=depth, name="ra-bounded")
    first = ahead.next()
    assert bytes(first) == b"\x00" * 16
    ahead.close()
    assert src.calls <= depth + 1
    assert not helpers_alive("ra-bounded")
    ahead.close()  # idempotent


def _sealed_file(tmp_path: Path, cipher: Cipher, payload: bytes, index: int = 7,
                 term: int = 2) -> tuple[str, int]:
    directory = tmp_path / "fsm"
    crc = fsm.write_fsm_snapshot_file(BytesSnapshot(payload, 1 << 16), str(directory), index,
                                      seal=(cipher, term))
    return fsm.fsm_snapshot_path(str(directory), index), crc


class Collect:
    def __init__(self, read: int = -1) -> None:
        self.data = b""
        self.read = read
        self.helper_seen = False

    def restore(self, reader: object) -> None:
        self.data = reader.read(self.read)  # type: ignore[attr-defined]
        self.helper_seen = bool(helpers_alive("trio-raft-sealed-read"))


def test_a_sealed_restore_of_many_chunks_reads_ahead_and_checks_everything(
        tmp_path: Path, cipher: Cipher) -> None:
    chunks = sealed_stream.READ_AHEAD_CHUNKS + 1
    payload = os.urandom(chunks * sealed_stream.DEFAULT_CHUNK_SIZE - 5)
    path, crc = _sealed_file(tmp_path, cipher, payload)
    sm = Collect()
    fsm.open_and_restore_fsm_snapshot(sm, path, crc, sealed=(cipher, 7, 2))
    assert sm.data == payload
    # Reading only part of it still verifies the rest (and the file's CRC) before returning.
    part = Collect(read=1000)
    fsm.open_and_restore_fsm_snapshot(part, path, crc, sealed=(cipher, 7, 2))
    assert part.data == payload[:1000]
    assert part.helper_seen  # one chunk opened, the next being read (or read) ahead
    assert not helpers_alive("trio-raft-sealed-read")


def test_damage_in_a_later_chunk_is_typed_and_leaves_no_helper(tmp_path: Path,
                                                                cipher: Cipher) -> None:
    chunks = sealed_stream.READ_AHEAD_CHUNKS + 1
    payload = os.urandom(chunks * sealed_stream.DEFAULT_CHUNK_SIZE)
    path, _crc = _sealed_file(tmp_path, cipher, payload)
    # Flip a byte in chunk 2 and put the CRC right again (footer and token), so only the
    # authentication can tell.
    with open(path, "r+b") as f:
        data = bytearray(f.read())
    body = len(data) - 4
    at = sealed_stream.HEADER_SIZE + 2 * (sealed_stream.DEFAULT_CHUNK_SIZE + 16) + 100
    data[at] ^= 0x40
    new_crc = crc32c.crc32c(bytes(data[:body]))
    data[body:] = new_crc.to_bytes(4, "big")
    with open(path, "wb") as f:
        f.write(data)
    sm = Collect()
    with pytest.raises(SealedSnapshotIntegrityError,
                       match=r"chunk 2 of \d+ does not verify") as info:
        fsm.open_and_restore_fsm_snapshot(sm, path, new_crc, sealed=(cipher, 7, 2))
    assert path in str(info.value)
    assert sm.data == b""  # nothing of the damaged payload reached the state machine
    assert not helpers_alive("trio-raft-sealed-read")


def test_a_file_cut_short_while_read_ahead_is_typed(tmp_path: Path, cipher: Cipher) -> None:
    chunks = sealed_stream.READ_AHEAD_CHUNKS + 2
    payload = os.urandom(chunks * sealed_stream.DEFAULT_CHUNK_SIZE)
    path, _crc = _sealed_file(tmp_path, cipher, payload)
    size = os.path.getsize(path) - 4
    with open(path, "rb") as f, open(path + ".raw", "wb") as out:
        out.write(f.read(size))

    class Shrinking:
        """A raw reader whose file ends two chunks early (it shrank while being read)."""

        def __init__(self) -> None:
            self.f = open(path + ".raw", "rb")  # noqa: SIM115
            self.left = size - 2 * (sealed_stream.DEFAULT_CHUNK_SIZE + 16)

        def read(self, n: int = -1) -> bytes:
            out = self.f.read(min(n, self.left))
            self.left -= len(out)
            return out

        def readinto(self, view: memoryview) -> int:
            n = self.f.readinto(view[:max(0, min(len(view), self.left))])
            self.left -= n
            return n

    raw = Shrinking()
    assert cipher.keystore is not None
    reader = sealed_stream.open_payload(raw, size, keys=cipher.keystore.key_bytes, index=7,
                                        term=2, where=path)
    with pytest.raises(SealedSnapshotIntegrityError, match=r"ends \d+ bytes early") as info:
        while reader.read(1 << 20):
            pass
    assert path in str(info.value)
    reader.close()
    raw.f.close()
    assert not helpers_alive("trio-raft-sealed-read")

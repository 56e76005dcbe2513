"""Raft envelope support in the engine: wrap on propose, unwrap on apply, the cutover barrier,
key rotation entries, the persisted cutover index and the encryption scanner (spec h, a.4).

Theory of operation
-------------------
Regimes. An entry at or below the *cutover index* is cleartext; an entry strictly above it
carries a wrapped payload (``trio_raft.envelope``) inside the usual proposal envelope
``0x01 | request id | payload``. The cutover is the index of the cleartext *cutover marker*, an
envelope control record (``trio_raft.envelope.control``). It is resolved as:
``OpenConfig.raft_cutover_index()`` when that callable is given (it wins; None or >= 2**64-1 means
inert); otherwise the index this node recorded when it applied the marker, persisted in
``<data_dir>/trio-raft-envelope-cutover.bin``; otherwise inert (nothing is unwrapped).

Why a file and not "find the marker again at replay": once a snapshot covers the marker the
WAL no longer holds it, yet the regime must survive restarts. The file is written (atomically,
fsynced) while the marker applies, before the applied index moves past it, so any snapshot
that covers the marker implies the file is on disk; replaying the marker rewrites nothing.

Control records (marker, rotation) are handled here, before the state machine: they install
the KEK-sealed key they carry into this node's cipher (and activate it); the marker also sets
the cutover. A control record whose key cannot be installed (no cipher, wrong KEK, damaged) is
fatal like an unwrap failure; a rotation that reuses an installed key id with other material
(two leaders raced) is ignored on every node alike, so the first one wins.

The invariant the barrier protects: no cleartext user entry may land above the marker.
* ``enable_raft_envelope`` raises the barrier (non-admin proposals get the retryable
  EnvelopeCutoverInProgressError), waits until everything already in the log has applied,
  proposes the marker and waits for it to apply. Admin proposals are admitted until the marker
  is queued.
* From the moment the marker is queued until it applies (on any node: a follower tracks markers
  it appends, so a new leader with an unapplied marker in its log behaves the same), every
  cleartext proposal is refused when it is built, and cleartext requests already queued are
  failed (they would be admitted after the marker).
* The payload is wrapped or not synchronously right before the request is queued, and the
  marker's apply fails whatever cleartext is still queued, so a proposal built in one regime is
  never admitted in the other.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from trio_raft.core.errors import CompactedError, UnavailableError
from trio_raft.core.messages import Entry, EntryType
from trio_raft.engine.config import OpenConfig
from trio_raft.engine.contexts import decode_proposal
from trio_raft.engine.loop import RunLoop
from trio_raft.engine.requests import ProposeRequest
from trio_raft.engine.types import ProposalResult, State
from trio_raft.engine.waiters import Waiter
from trio_raft.envelope.control import ControlRecord, Opcode, decode_control, is_control
from trio_raft.envelope.errors import (
    EncryptionScanError,
    KeyConflictError,
    KeyStoreCorruptError,
    ReservedPrefixError,
)
from trio_raft.errors import (
    EnvelopeCutoverInProgressError,
    NilKeystoreError,
    NotLeaderError,
    RaftUnwrapFailedError,
)
from trio_raft.storage.fileutil import remove_stale_temp_files, replace_file

logger = logging.getLogger(__name__)

MAX_U64 = (1 << 64) - 1
SCAN_BATCH_BYTES = 64 << 20
CUTOVER_FILE = "trio-raft-envelope-cutover.bin"
_CUTOVER = struct.Struct(">4sBQ")
_CRC = struct.Struct(">I")
_CUTOVER_MAGIC = b"TREC"


# -- the persisted cutover index ------------------------------------------------------------------
def save_cutover(data_dir: str, index: int) -> None:
    """``magic "TREC" | version u8 | index u64 | crc32 u32``, replaced atomically."""
    body = _CUTOVER.pack(_CUTOVER_MAGIC, 1, index)
    replace_file(os.path.join(data_dir, CUTOVER_FILE), body + _CRC.pack(zlib.crc32(body)))


def load_cutover(data_dir: str) -> int | None:
    remove_stale_temp_files(data_dir, CUTOVER_FILE)
    path = os.path.join(data_dir, CUTOVER_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) != _CUTOVER.size + _CRC.size:
        raise KeyStoreCorruptError(f"{path}: {len(data)} bytes")
    body, (crc,) = data[: _CUTOVER.size], _CRC.unpack_from(data, _CUTOVER.size)
    magic, version, index = _CUTOVER.unpack(body)
    if zlib.crc32(body) != crc or magic != _CUTOVER_MAGIC or version != 1:
        raise KeyStoreCorruptError(f"{path}: checksum, magic or version mismatch")
    return int(index)


def resolve_cutover(cfg: OpenConfig, recorded: int | None) -> int | None:
    fn = cfg.raft_cutover_index
    value = fn() if fn is not None else recorded
    if value is None or value >= MAX_U64:
        return None
    return int(value)


def control_payload(ent: Entry) -> bytes | None:
    """The payload of a normal proposal entry that is an envelope control record, else None."""
    if ent.type is not EntryType.NORMAL:
        return None
    env = decode_proposal(ent.data)
    if env is None or not is_control(env[1]):
        return None
    return env[1]


# -- spec a.4 ------------------------------------------------------------------------------------
@attrs.frozen
class EncryptionScanner:
    """Answers whether a log range holds envelope control records (marker, rotation)."""

    storage: Callable[[], Any]
    batch_bytes: int = SCAN_BATCH_BYTES

    def has_encryption_relevant_entry_in_range(self, start_exclusive: int,
                                               end_inclusive: int) -> bool:
        storage = self.storage()
        if storage is None:
            raise EncryptionScanError("no log storage")
        if end_inclusive >= MAX_U64:
            raise EncryptionScanError("end index must be below 2**64-1")
        lo = start_exclusive + 1
        while lo <= end_inclusive:
            batch: Sequence[Entry] = storage.entries(lo, end_inclusive + 1, self.batch_bytes)
            if not batch:
                raise EncryptionScanError(f"unscanned gap at index {lo}")
            for ent in batch:
                if control_payload(ent) is not None:
                    return True
            lo = batch[-1].index + 1
        return False


class EnvelopeMixin(RunLoop):
    """The engine's envelope behaviour; comes before RunLoop in Engine's bases."""

    def __init__(self, config: OpenConfig) -> None:
        super().__init__(config)
        self._env_cipher: Any = self._cfg.raft_cipher
        self._env_cutover: int | None = None  # recorded on this node (file / marker apply)
        self._env_enabling = False
        self._env_marker_req: ProposeRequest | None = None
        self._env_marker_floor = 0  # newest marker appended while cleartext, not yet applied

    # -- opening -------------------------------------------------------------------------------
    async def _open_disk(self) -> None:
        await super()._open_disk()
        try:
            self._env_cutover = await self._io_raw(load_cutover, self._disk.data_dir)
            if self._env_cutover_index() is None:
                self._env_note_markers(self._env_unapplied_entries())
        except BaseException:
            await self._close_disk()
            raise
        if self._env_cutover is not None:
            logger.info("raft envelope cutover index %d", self._env_cutover)

    def _env_unapplied_entries(self) -> list[Entry]:
        lo, hi = self._applied + 1, self._storage.last_index() + 1
        if lo >= hi:
            return []
        try:
            return list(self._storage.entries(max(lo, self._storage.first_index()), hi))
        except (CompactedError, UnavailableError):
            return []

    # -- public API ----------------------------------------------------------------------------
    def raft_cutover_index(self) -> int | None:
        """The cutover index in force (None: inert, nothing is unwrapped)."""
        return self._env_cutover_index()

    def raft_cipher(self) -> Any:
        return self._env_cipher

    def encryption_scanner(self) -> EncryptionScanner:
        return EncryptionScanner(lambda: self._storage)

    async def enable_raft_envelope(self, cipher: Any) -> int:
        """Move the cluster to wrapped entries; returns the cutover index (the marker's index).

        Raises the barrier, waits for the log to drain into the state machine, proposes the
        cleartext marker (it carries the active key, sealed by the KEK, so every node installs
        it) and returns once the marker has applied here; wrapping is on from then. Idempotent
        once a cutover exists. NotLeaderError / LeadershipLostError as for proposals; after
        LeadershipLostError the marker may still commit (nodes switch when they apply it).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_closed()
        if cipher is None:
            raise NilKeystoreError("enable_raft_envelope needs a cipher")
        current = self._env_cutover_index()
        if current is not None:
            self._env_cipher = cipher
            return current
        if self._env_enabling or self._env_marker_in_flight():
            raise EnvelopeCutoverInProgressError("another cutover is running")
        if self._status.state is not State.LEADER:
            raise NotLeaderError()
        self._env_cipher = cipher
        self._env_enabling = True
        self._wake()
        req: ProposeRequest | None = None
        try:
            await self._env_wait_log_applied()
            key_id, sealed = cipher.active_or_new_sealed_key()
            record = ControlRecord(Opcode.CUTOVER, key_id, sealed).encode()
            req = ProposeRequest(self._next_request_id(), record, Waiter(), True)
            self._env_marker_req = req
            result = await self._await_request(req)
            logger.info("raft envelope enabled: cutover index %d, key id %d",
                        result.commit_index, key_id)
            return result.commit_index
        finally:
            self._env_enabling = False
            if req is not None and req.waiter.done and self._env_marker_req is req:
                self._env_marker_req = None

    async def rotate_raft_key(self) -> int:
        """Replicate a new data key and make it the active one on every node; returns its id.
        Older keys stay installed to read older entries."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_closed()
        cipher = self._env_cipher
        if cipher is None:
            raise NilKeystoreError("no raft cipher wired")
        key_id, sealed = cipher.new_sealed_key()
        record = ControlRecord(Opcode.ROTATE, key_id, sealed).encode()
        await self._await_request(ProposeRequest(self._next_request_id(), record, Waiter(), True))
        return int(key_id)

    async def _await_request(self, req: ProposeRequest) -> ProposalResult:
        self._submit(req)
        try:
            result: ProposalResult = await req.waiter.wait()
            return result
        finally:
            self._pending_proposals.discard(req.request_id, req.waiter)

    async def _env_wait_log_applied(self) -> None:
        assert self._node is not None
        target = self._node.raft.log.last_index()
        while self._applied < target:
            self._raise_if_closed()
            if self._status.state is not State.LEADER:
                raise NotLeaderError("leadership lost during the envelope cutover")
            await trio.sleep(self._cfg.tick_interval)

    # -- propose side --------------------------------------------------------------------------
    def _env_cutover_index(self) -> int | None:
        return resolve_cutover(self._cfg, self._env_cutover)

    def _env_marker_in_flight(self) -> bool:
        req = self._env_marker_req
        return (req is not None and not req.waiter.done) or self._env_marker_floor > self._applied

    def _envelope_payload(self, data: bytes, admin: bool) -> bytes:
        """The payload to put in the proposal envelope (called right before queueing)."""
        if self._env_cutover_index() is not None:
            cipher = self._env_cipher
            if cipher is None:
                raise NilKeystoreError("no raft cipher wired; cannot wrap above the cutover")
            return bytes(cipher.wrap(data))
        if is_control(data):
            raise ReservedPrefixError()
        if self._env_marker_in_flight() or (self._env_enabling and not admin):
            raise EnvelopeCutoverInProgressError()
        return data

    def _barrier_reason(self, admin: bool) -> BaseException | None:
        err = super()._barrier_reason(admin)
        if err is not None or admin or self._env_cutover_index() is not None:
            return err
        if self._env_enabling or self._env_marker_in_flight():
            return EnvelopeCutoverInProgressError()
        return None

    def _env_fail_queued_cleartext(self) -> None:
        """Fail queued proposals built in the cleartext regime (they would land above the
        marker). Control records stay."""
        kept: deque[Any] = deque()
        failed = 0
        while self._requests:
            req = self._requests.popleft()
            if isinstance(req, ProposeRequest) and not is_control(req.data):
                self._pending_proposals.discard(req.request_id, req.waiter)
                req.waiter.fail(EnvelopeCutoverInProgressError())
                failed += 1
            else:
                kept.append(req)
        self._requests.extend(kept)
        if failed:
            logger.info("envelope cutover: failed %d queued cleartext proposal(s)", failed)

    # -- log side ------------------------------------------------------------------------------
    def _mark_fence(self, entries: Sequence[Entry]) -> None:
        super()._mark_fence(entries)
        if self._env_cutover_index() is None:
            self._env_note_markers(entries)

    def _env_note_markers(self, entries: Sequence[Entry]) -> None:
        for ent in entries:
            payload = control_payload(ent)
            if payload is None or payload[0] != Opcode.CUTOVER:
                continue
            self._env_marker_floor = max(self._env_marker_floor, ent.index)
            req = self._env_marker_req
            env = decode_proposal(ent.data)
            if req is not None and env is not None and env[0] == req.request_id:
                self._env_marker_req = None  # the floor tracks it from here
            self._env_fail_queued_cleartext()

    # -- apply side ----------------------------------------------------------------------------
    def _apply_engine_record(self, ent: Entry, request_id: int, payload: bytes) -> bool:
        if not is_control(payload):
            return False
        key_id = self._env_apply_control(ent.index, payload)
        self._applied = ent.index
        w = self._pending_proposals.pop(request_id)
        if w is not None:
            w.resolve(ProposalResult(ent.index, key_id))
        return True

    def _apply_non_proposal(self, ent: Entry) -> None:
        if ent.data:
            cutover = self._env_cutover_index()
            if cutover is not None and ent.index > cutover:
                # Only empty no-ops and proposal envelopes are written above the cutover;
                # anything else was damaged and must not be skipped silently.
                raise RaftUnwrapFailedError(f"entry {ent.index}: not a proposal envelope")
        super()._apply_non_proposal(ent)

    def _unwrap_payload(self, index: int, payload: bytes) -> bytes:
        cutover = self._env_cutover_index()
        if cutover is None or index <= cutover:
            return payload
        cipher = self._env_cipher
        if cipher is None:
            raise RaftUnwrapFailedError(f"entry {index}: no raft cipher wired")
        try:
            return bytes(cipher.unwrap(payload))
        except Exception as exc:
            raise RaftUnwrapFailedError(f"entry {index}: {exc}") from exc

    def _env_apply_control(self, index: int, payload: bytes) -> int:
        """Install the record's key; the marker also sets (and persists) the cutover."""
        cipher = self._env_cipher
        try:
            rec = decode_control(payload)
            if cipher is None:
                raise NilKeystoreError("no raft cipher wired")
            cipher.install_sealed(rec.key_id, rec.sealed_dek, activate=True)
        except KeyConflictError as exc:
            logger.warning("entry %d: key rotation ignored: %s", index, exc)
            return 0
        except Exception as exc:
            raise RaftUnwrapFailedError(f"entry {index}: cannot install key: {exc}") from exc
        if rec.opcode is Opcode.CUTOVER:
            if self._env_cutover is None:
                save_cutover(self._disk.data_dir, index)
                self._env_cutover = index
                logger.info("raft envelope cutover at index %d (key id %d)", index, rec.key_id)
                self._env_fail_queued_cleartext()
            elif self._env_cutover != index:
                logger.warning("entry %d: another cutover marker ignored (cutover is %d)",
                               index, self._env_cutover)
            if self._env_marker_floor <= index:
                self._env_marker_floor = 0
        return int(rec.key_id)

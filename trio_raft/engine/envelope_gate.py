"""The raft envelope in the engine: wrap on propose, unwrap on apply, the cutover barrier, key
records (``docs/envelope.md``); the encryption scanner is in ``envelope_scan.py``.

Regimes. An entry at or below the *cutover index* is cleartext; an entry strictly above it
carries a wrapped payload (``trio_raft.envelope``) inside the usual proposal envelope
``0x01 | request id | payload``. The cutover is the index of the cleartext *cutover marker*, an
envelope control record (``trio_raft.envelope.control``). It is resolved as:
``OpenConfig.raft_cutover_index()`` when that callable is given (it wins; None or >= 2**64-1
means inert); otherwise the index this node recorded when it applied the marker
(``trio_raft.storage.cutover``); otherwise inert (nothing is unwrapped).

Control records (marker, rotation) are handled here, before the state machine: they install the
KEK-sealed key they carry into this node's cipher (and activate it); the marker also sets the
cutover. A control record whose key cannot be installed (no cipher, wrong KEK, damaged) is
fatal like an unwrap failure; a rotation that reuses an installed key id with other material
(two leaders raced) is ignored on every node alike, so the first one wins.

Snapshots carry the envelope (``trio_raft/storage/descriptor.py``): every snapshot this node
writes with the envelope on has its payload sealed under the active key and its descriptor
holds the KEK-sealed key ring and the cutover (``snapshot_envelope``). A node that installs a
snapshot (from a leader, or at open from its own data dir) installs the ring's keys and, when
it has recorded no cutover, records the snapshot's (``adopt_envelope``), so it can read the
payload and every entry after it. A node that knows the envelope is on above its cutover
refuses a cleartext snapshot payload there (``sealed_required``).

Classification. Every entry is cleartext or wrapped by its index alone, and a node knows the
cutover from its log, its snapshot or its cutover file. What would contradict that stops the
engine with :class:`~trio_raft.errors.EnvelopeRegimeError` (fatal, like an unwrap failure)
before anything reaches the state machine: an entry taken for cleartext that authenticates as
an envelope under an installed key (a node that lost its cutover file and restored from a
snapshot written before snapshots carried the cutover), or a sealed snapshot without a
cutover.

The invariant the barrier protects: no cleartext user entry may land above the marker.

* ``enable`` raises the barrier (non-admin proposals get the retryable
  EnvelopeCutoverInProgressError), waits until everything already in the log has applied,
  proposes the marker and waits for it to apply. Admin proposals are admitted until the marker
  is queued.
* From the moment the marker is queued until it applies (on any node: a node tracks markers it
  appends, so a new leader with an unapplied marker in its log behaves the same), every
  cleartext proposal is refused when it is built, and cleartext requests already queued are
  failed (they would be admitted after the marker).
* Whether the payload is wrapped is decided synchronously right before the request is queued
  (``must_seal``; the wrapping itself happens when the loop admits it, ``wrap_admitted``), and
  the marker's apply fails whatever cleartext is still queued, so a proposal built in one
  regime is never admitted in the other.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio

from trio_raft.core.errors import CompactedError, UnavailableError
from trio_raft.core.messages import Entry, EntryType
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.contexts import decode_proposal
from trio_raft.engine.envelope_scan import control_payload
from trio_raft.engine.inbox import Inbox
from trio_raft.engine.requests import ProposeRequest, Request
from trio_raft.engine.types import ProposalResult
from trio_raft.engine.waiters import Waiter, WaiterTable
from trio_raft.envelope.cipher import Cipher, CipherCounts
from trio_raft.envelope.control import ControlRecord, Opcode, decode_control, is_control
from trio_raft.envelope.errors import (
    KeyConflictError,
    ReservedPrefixError,
)
from trio_raft.errors import (
    EnvelopeCutoverInProgressError,
    EnvelopeRegimeError,
    NilKeystoreError,
    NotLeaderError,
    RaftUnwrapFailedError,
    SealedSnapshotRequiredError,
)
from trio_raft.storage.cutover import save_cutover
from trio_raft.storage.descriptor import NO_ENVELOPE, EnvelopeState, KeyRing
from trio_raft.storage.fileio import FileIO

logger = logging.getLogger(__name__)

MAX_U64 = (1 << 64) - 1
#: Plaintexts of this node's own wrapped proposals kept for their apply (``unwrap``); past
#: this many (proposals that never applied, or a deep pipeline) the oldest is dropped and its
#: entry is decrypted like any other.
OWN_PLAINTEXTS = 8192


class RequestPort(Protocol):
    """What ``enable``/``rotate`` need from the run loop to get a record committed."""

    @property
    def applied(self) -> int: ...

    def check_open(self) -> None: ...

    def is_leader(self) -> bool: ...

    def last_log_index(self) -> int: ...

    def new_request_id(self) -> int: ...

    async def run_request(self, req: Request) -> object: ...


@attrs.frozen
class EnvelopeStatus:
    """The raft envelope on one node (``Engine.envelope_status``)."""

    #: Whether a cutover is in force (entries above it are wrapped, snapshots sealed).
    on: bool
    #: The key new entries and snapshots are sealed with (0: none).
    active_key_id: int
    cutover_index: int | None
    #: What the node's cipher did since it opened (wraps, unwraps, sealed payloads, failures).
    counts: CipherCounts
    #: The fingerprint of the KEK the node's key store is sealed with ("" without one): every
    #: node must show the same before keys are rotated or the envelope enabled
    #: (docs/operations.md, "Rotate the KEK").
    kek_fingerprint: str = ""


def adopt_envelope(cipher: Cipher | None, env: EnvelopeState, *, where: str,
                   activate: bool) -> None:
    """Install the keys a snapshot carries into ``cipher`` (activating the ring's active key
    when ``activate`` or when the cipher has none active). A snapshot with the envelope on
    and no cipher to take its keys, a key that does not open with this node's KEK, or a
    sealed snapshot without a cutover is fatal (:class:`RaftUnwrapFailedError`)."""
    if env.sealed_key_id and env.cutover_index is None:
        raise EnvelopeRegimeError(f"{where}: the payload is sealed but the snapshot carries no "
                                  "cutover index")
    ring = env.key_ring
    if ring is None:
        return
    if cipher is None:
        raise RaftUnwrapFailedError(f"{where}: the snapshot carries the envelope's keys and no "
                                    "raft cipher is wired")
    try:
        for key_id, sealed in ring.keys:
            try:
                cipher.install_sealed(key_id, sealed, activate=False)
            except KeyConflictError as exc:  # a raced rotation: the installed key stays
                logger.warning("%s: key id %d not taken: %s", where, key_id, exc)
        if ring.active and (activate or not cipher.active_key_id):
            cipher.install_sealed(ring.active, dict(ring.keys)[ring.active], activate=True)
    except Exception as exc:
        raise RaftUnwrapFailedError(f"{where}: cannot install the snapshot's keys: {exc}"
                                    ) from exc


def _cutover_value(value: int | None) -> int | None:
    return None if value is None or value >= MAX_U64 else int(value)


class EnvelopeGate:
    """See the module docstring."""

    def __init__(self, *, cipher: Cipher | None, configured: Callable[[], int] | None,
                 recorded: int | None, data_dir: str, file_io: FileIO, inbox: Inbox,
                 proposals: WaiterTable, applied: Callable[[], int],
                 tick_interval: float) -> None:
        self.cipher = cipher
        self._configured = configured
        #: The cutover recorded on this node (cutover file / marker apply), None before.
        self._recorded = recorded
        #: ``cutover_index()`` when nothing is configured (kept with ``_recorded``).
        self._from_record = _cutover_value(recorded)
        self._data_dir = data_dir
        self._file_io = file_io
        self._inbox = inbox
        self._proposals = proposals
        self._applied = applied
        self._tick_interval = tick_interval
        self._enabling = False
        self._marker_req: ProposeRequest | None = None
        #: Newest marker appended while cleartext and not yet applied (0: none).
        self._marker_floor = 0
        #: request id -> (envelope, plaintext) of entries this node wrapped, oldest first.
        self._own: dict[int, tuple[bytes, bytes]] = {}
        #: index -> (envelope, plaintext) decrypted ahead by ``prepare`` for this apply.
        self._prepared: dict[int, tuple[bytes, bytes]] = {}

    # -- views ---------------------------------------------------------------------------------
    def cutover_index(self) -> int | None:
        """The cutover in force (None: inert, nothing is unwrapped)."""
        if self._configured is None:
            return self._from_record
        return _cutover_value(self._configured())

    def _record(self, index: int) -> None:
        self._recorded = index
        self._from_record = _cutover_value(index)

    def sealed_required(self, index: int) -> bool:
        """Whether a snapshot payload at ``index`` must be sealed (above the cutover)."""
        cutover = self.cutover_index()
        return cutover is not None and index > cutover

    def snapshot_envelope(self) -> tuple[Cipher | None, EnvelopeState]:
        """How to write a snapshot now: (the cipher to seal with, the envelope records); (None,
        no records) before the cutover. Above it a node without a cipher cannot write one."""
        cutover = self.cutover_index()
        if cutover is None:
            return None, NO_ENVELOPE
        cipher = self.cipher
        if cipher is None:
            raise NilKeystoreError("no raft cipher wired; cannot seal a snapshot above the "
                                   "cutover")
        active, keys = cipher.sealed_ring()
        return cipher, EnvelopeState(cutover, KeyRing(active, keys), active)

    def adopt_snapshot(self, env: EnvelopeState, index: int) -> None:
        """Before installing the snapshot at ``index``: refuse a cleartext one above the
        cutover, take its keys, and record its cutover when this node has none."""
        where = f"the snapshot at index {index}"
        if self.sealed_required(index) and not env.sealed_key_id:
            raise SealedSnapshotRequiredError(f"{where} is not sealed, and this node's "
                                              f"envelope cutover is {self.cutover_index()}")
        adopt_envelope(self.cipher, env, where=where, activate=True)
        if env.cutover_index is not None and self._recorded is None:
            save_cutover(self._data_dir, env.cutover_index, file_io=self._file_io)
            self._record(env.cutover_index)
            logger.info("raft envelope cutover %d taken from %s", env.cutover_index, where)
            if self._marker_floor <= env.cutover_index:
                self._marker_floor = 0
            self._fail_queued_cleartext()

    def _marker_in_flight(self) -> bool:
        req = self._marker_req
        return (req is not None and not req.waiter.done) or self._marker_floor > self._applied()

    # -- propose side --------------------------------------------------------------------------
    def must_seal(self, data: bytes, admin: bool) -> bool:
        """Called right before a proposal is queued: whether its payload is to be wrapped
        (above the cutover), or why it may not be queued now (the barrier)."""
        if self.cutover_index() is not None:
            if self.cipher is None:
                raise NilKeystoreError("no raft cipher wired; cannot wrap above the cutover")
            return True
        if is_control(data):
            raise ReservedPrefixError()
        if self._marker_in_flight() or (self._enabling and not admin):
            raise EnvelopeCutoverInProgressError()
        return False

    def wrap_admitted(self, requests: Sequence[ProposeRequest]) -> list[bytes | Exception]:
        """The envelopes of proposals built above the cutover (``must_seal``), made when the
        run loop admits them, back to back (see ``prepare``): one per request in order, or the
        exception that request fails with. Each plaintext is kept under its request id for this
        node's apply (see :meth:`unwrap`)."""
        cipher = self.cipher
        if cipher is None:
            return [NilKeystoreError("no raft cipher wired; cannot wrap above the cutover")
                    for _ in requests]
        wrapped = cipher.wrap_many([r.data for r in requests])
        own = self._own
        for req, envelope in zip(requests, wrapped):
            if not isinstance(envelope, Exception):
                own[req.request_id] = (envelope, req.data)
        excess = len(own) - OWN_PLAINTEXTS
        if excess > 0:  # the oldest go: those entries are decrypted instead
            for request_id in list(itertools.islice(own, excess)):
                del own[request_id]
        return wrapped

    def reject_reason(self, admin: bool) -> BaseException | None:
        """Loop side: why a proposal must not be admitted now (None: admit it)."""
        if admin or self.cutover_index() is not None:
            return None
        if self._enabling or self._marker_in_flight():
            return EnvelopeCutoverInProgressError()
        return None

    # -- log side ------------------------------------------------------------------------------
    def note_appended(self, entries: Sequence[Entry]) -> None:
        """Track cutover markers written to the log while still cleartext."""
        if self.cutover_index() is not None:
            return
        for ent in entries:
            payload = control_payload(ent)
            if payload is None or payload[0] != Opcode.CUTOVER:
                continue
            self._marker_floor = max(self._marker_floor, ent.index)
            req = self._marker_req
            env = decode_proposal(ent.data)
            if req is not None and env is not None and env[0] == req.request_id:
                self._marker_req = None  # the floor tracks it from here
            self._fail_queued_cleartext()

    def note_unapplied(self, storage: MemoryStorage, applied: int) -> None:
        """At open: track markers in the log above the applied index."""
        if self.cutover_index() is not None:
            return
        lo, hi = applied + 1, storage.last_index() + 1
        if lo >= hi:
            return
        try:
            entries = storage.entries(max(lo, storage.first_index()), hi)
        except (CompactedError, UnavailableError):
            return
        self.note_appended(entries)

    def _fail_queued_cleartext(self) -> None:
        """Fail queued proposals built in the cleartext regime (they would land above the
        marker). Control records stay."""
        queue = self._inbox.requests
        kept: deque[Request] = deque()
        failed = 0
        while queue:
            req = queue.popleft()
            if isinstance(req, ProposeRequest) and not req.seal and not is_control(req.data):
                self._proposals.discard(req.request_id, req.waiter)
                req.waiter.fail(EnvelopeCutoverInProgressError())
                failed += 1
            else:
                kept.append(req)
        queue.extend(kept)
        if failed:
            logger.info("envelope cutover: failed %d queued cleartext proposal(s)", failed)

    # -- apply side ----------------------------------------------------------------------------
    def apply_control(self, index: int, payload: bytes) -> int | None:
        """Apply ``payload`` if it is a control record (returns the key id it installed, 0
        when ignored); None when it is not one (an ordinary proposal)."""
        if not is_control(payload):
            return None
        cipher = self.cipher
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
            if self._recorded is None:
                save_cutover(self._data_dir, index, file_io=self._file_io)
                self._record(index)
                logger.info("raft envelope cutover at index %d (key id %d)", index, rec.key_id)
                self._fail_queued_cleartext()
            elif self._recorded != index:
                logger.warning("entry %d: another cutover marker ignored (cutover is %d)",
                               index, self._recorded)
            if self._marker_floor <= index:
                self._marker_floor = 0
        return int(rec.key_id)

    def check_non_proposal(self, ent: Entry) -> None:
        """Only empty no-ops and proposal envelopes are written above the cutover; anything
        else there was damaged and must not be skipped silently."""
        cutover = self.cutover_index()
        if ent.data and cutover is not None and ent.index > cutover:
            raise RaftUnwrapFailedError(f"entry {ent.index}: not a proposal envelope")

    def prepare(self, entries: Sequence[Entry], floor: int
                ) -> list[tuple[int, bytes] | None] | None:
        """Decrypt, back to back, the envelopes among ``entries`` (committed, about to be
        applied; those at or below ``floor`` are not) that :meth:`unwrap` will be asked for.
        One decryption between two applies finds the AES code and tables out of the CPU's
        caches and costs about three times one in a row (docs/envelope.md, "Cost"). What does
        not open here is left to :meth:`unwrap`, which raises for it in its turn.

        Returns the proposal envelope of each entry (``decode_proposal``; None for the others)
        so that the applier does not open them a second time; None when nothing was done
        (the envelope is inert, or a single entry)."""
        cutover = self.cutover_index()
        cipher = self.cipher
        if cutover is None or cipher is None or len(entries) < 2:
            return None
        normal = EntryType.NORMAL
        envs = [decode_proposal(ent.data) if ent.type is normal else None for ent in entries]
        own = self._own
        low = max(cutover, floor)
        # Control records need no test here: their first byte is never the wrapped layout's
        # version, so ``unwrap_batch`` leaves them out (``trio_raft/envelope/control.py``).
        todo = [(ent.index, env[1]) for ent, env in zip(entries, envs)
                if env is not None and ent.index > low and env[0] not in own]
        if len(todo) > 1:
            self._prepared = cipher.unwrap_batch(todo)
        return envs

    def discard_prepared(self) -> None:
        if self._prepared:
            self._prepared = {}

    def unwrap(self, index: int, payload: bytes, request_id: int = 0) -> bytes:
        """The plaintext of the payload of the entry at ``index``. An entry that holds the very
        envelope this node made for ``request_id`` (:meth:`wrap_admitted`) is not decrypted:
        its plaintext is the one kept (AES-GCM opens an envelope to what was sealed in it)."""
        cutover = self.cutover_index()
        if cutover is not None and index > cutover:
            if request_id:
                own = self._own.pop(request_id, None)
                if own is not None and own[0] == payload:
                    return own[1]
            if self._prepared:
                ready = self._prepared.pop(index, None)
                if ready is not None and ready[0] == payload:
                    return ready[1]
            cipher = self.cipher
            if cipher is None:
                raise RaftUnwrapFailedError(f"entry {index}: no raft cipher wired")
            try:
                return bytes(cipher.unwrap(payload))
            except Exception as exc:
                raise RaftUnwrapFailedError(f"entry {index}: {exc}") from exc
        if self.cipher is not None and self.cipher.try_unwrap(payload) is not None:
            raise EnvelopeRegimeError(
                f"entry {index}: taken for cleartext (cutover "
                f"{'unknown' if cutover is None else cutover}), but it is an envelope "
                "under an installed key")
        return payload

    # -- the cutover and rotation --------------------------------------------------------------
    async def enable(self, cipher: Cipher | None, port: RequestPort) -> int:
        """The cutover (``Engine.enable_raft_envelope``); returns the marker's index."""
        await trio.lowlevel.checkpoint_if_cancelled()
        port.check_open()
        if cipher is None:
            raise NilKeystoreError("enable_raft_envelope needs a cipher")
        current = self.cutover_index()
        if current is not None:
            self.cipher = cipher
            return current
        if self._enabling or self._marker_in_flight():
            raise EnvelopeCutoverInProgressError("another cutover is running")
        if not port.is_leader():
            raise NotLeaderError()
        self.cipher = cipher
        self._enabling = True
        req: ProposeRequest | None = None
        try:
            await self.wait_log_applied(port)
            key_id, sealed = cipher.active_or_new_sealed_key()
            record = ControlRecord(Opcode.CUTOVER, key_id, sealed).encode()
            req = ProposeRequest(port.new_request_id(), record, Waiter(), True)
            self._marker_req = req
            result = await port.run_request(req)
            assert isinstance(result, ProposalResult)
            logger.info("raft envelope enabled: cutover index %d, key id %d",
                        result.commit_index, key_id)
            return result.commit_index
        finally:
            self._enabling = False
            if req is not None and req.waiter.done and self._marker_req is req:
                self._marker_req = None

    async def wait_log_applied(self, port: RequestPort) -> None:
        """Wait until everything in the log when this was called has applied."""
        target = port.last_log_index()
        while port.applied < target:
            port.check_open()
            if not port.is_leader():
                raise NotLeaderError("leadership lost during the envelope cutover")
            await trio.sleep(self._tick_interval)

    async def rotate(self, port: RequestPort) -> int:
        """Replicate a new data key and make it the active one on every node; returns its id."""
        await trio.lowlevel.checkpoint_if_cancelled()
        port.check_open()
        cipher = self.cipher
        if cipher is None:
            raise NilKeystoreError("no raft cipher wired")
        key_id, sealed = cipher.new_sealed_key()
        record = ControlRecord(Opcode.ROTATE, key_id, sealed).encode()
        await port.run_request(ProposeRequest(port.new_request_id(), record, Waiter(), True))
        return int(key_id)

"""Finding envelope control records (cutover marker, key rotation) in the log.

``control_payload`` tells whether one entry is such a record (a normal proposal entry whose
payload is an envelope control record, ``trio_raft/envelope/control.py``); the gate
(``envelope_gate.py``) handles them on apply. ``EncryptionScanner`` (``Engine.encryption_scanner``)
answers whether a range of the in-memory log holds one, reading it in bounded batches; a range
it cannot read whole (compacted, beyond the log) is an ``EncryptionScanError``, never a "no".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from trio_raft.core.messages import Entry, EntryType
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.contexts import decode_proposal
from trio_raft.envelope.control import is_control
from trio_raft.envelope.errors import EncryptionScanError

MAX_U64 = (1 << 64) - 1
SCAN_BATCH_BYTES = 64 << 20


def control_payload(ent: Entry) -> bytes | None:
    """The payload of a normal proposal entry that is an envelope control record, else None."""
    if ent.type is not EntryType.NORMAL:
        return None
    env = decode_proposal(ent.data)
    if env is None or not is_control(env[1]):
        return None
    return env[1]



@attrs.frozen
class EncryptionScanner:
    """Answers whether a log range holds envelope control records (marker, rotation)."""

    storage: Callable[[], MemoryStorage | None]
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

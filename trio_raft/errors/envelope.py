"""Envelope encryption errors, and the errors that halt applying (an entry that cannot be
unwrapped or classified, a state machine asking to halt).

Part of :mod:`trio_raft.errors` (which re-exports every name); the hierarchy and the
outcome families are described there and in ``docs/api.md``.
"""

from __future__ import annotations

from trio_raft.core.errors import (
    RaftError,
)


class EnvelopeError(RaftError):
    """Base of envelope (AES-256-GCM entry encryption) errors."""


class EnvelopeShortError(EnvelopeError):
    default_message = "envelope: too short"


class EnvelopeVersionError(EnvelopeError):
    default_message = "envelope: unsupported version"


class UnknownKeyIDError(EnvelopeError):
    default_message = "envelope: unknown key id"


class ReservedKeyIDError(EnvelopeError):
    default_message = "envelope: key id 0 is reserved"


class BadNonceSizeError(EnvelopeError):
    default_message = "envelope: bad nonce size"


class IntegrityError(EnvelopeError):
    default_message = "envelope: integrity check failed"


class NilKeystoreError(EnvelopeError):
    default_message = "envelope: no keystore"


class KeyStoreError(EnvelopeError):
    """The key store could not be read, written or used."""
    default_message = "envelope: key store error"


class KeyStoreCorruptError(KeyStoreError):
    """A key store or nonce state file failed its checksum or layout checks."""
    default_message = "envelope: key store file is corrupt"


class KEKError(KeyStoreError):
    """The key-encryption key is missing, malformed, misplaced, or does not match the store."""
    default_message = "envelope: key-encryption key error"


class KEKPermissionError(KEKError):
    """A KEK file is readable or writable by its group or by others (as ssh refuses such a
    private key): ``chmod 600`` it."""
    default_message = "envelope: KEK file permissions are too open"


class KeyConflictError(KeyStoreError):
    """A key id is already installed with different key material."""
    default_message = "envelope: key id already installed with different material"


class NonceExhaustedError(EnvelopeError):
    """The persisted nonce epoch has no values left; rotate to a new key store."""
    default_message = "envelope: nonce space exhausted"


class ReservedPrefixError(EnvelopeError):
    """A cleartext proposal starts with the prefix reserved for envelope control records."""
    default_message = "envelope: payload starts with the reserved control prefix"


class EncryptionScanError(EnvelopeError):
    """The encryption scanner could not scan the requested range (``docs/envelope.md``)."""
    default_message = "envelope: encryption scan failed"


class RaftUnwrapFailedError(RaftError):
    """An entry above the cutover could not be unwrapped. Fatal: apply halts on that entry."""
    default_message = "raft envelope unwrap failed; halting apply"


class EnvelopeRegimeError(RaftUnwrapFailedError):
    """An entry or snapshot whose regime (cleartext or wrapped) this node cannot establish:
    an entry it takes for cleartext authenticates as an envelope under an installed key, or a
    sealed snapshot carries no cutover index. Fatal like any unwrap failure: nothing of it
    reaches the state machine."""
    default_message = "raft envelope: cannot classify entry; halting apply"



class FSMApplyHaltError(RaftError):
    """The state machine asked apply to halt: a response whose ``halt_apply()`` returned an
    error."""
    default_message = "FSM-requested apply halt"

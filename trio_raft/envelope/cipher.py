"""``Cipher``: the key store and the nonce source behind ``wrap`` / ``unwrap``.

    cipher = Cipher.open(key_dir, KEK.from_env("TRIO_RAFT_KEK"), node_id=engine_node_id)
    blob = cipher.wrap(b"payload")        # with the active key and a fresh nonce
    cipher.unwrap(blob) == b"payload"      # with whichever key id the envelope names

One Cipher per key directory at a time (the nonce epoch is per open; the key file is rewritten
from this object's view). Wrapping is thread-safe.
"""

from __future__ import annotations

import os
import secrets

from trio_raft.envelope import envelope as env
from trio_raft.envelope.keystore import KEK, KeyStore, seal_dek
from trio_raft.envelope.nonce import NonceSource
from trio_raft.errors import NilKeystoreError, UnknownKeyIDError


class Cipher:
    def __init__(self, keystore: KeyStore | None, nonces: NonceSource | None) -> None:
        self.keystore = keystore
        self.nonces = nonces

    @classmethod
    def open(cls, key_dir: str | os.PathLike[str], kek: KEK, *, node_id: int) -> Cipher:
        """Open the key store in ``key_dir`` and bump its nonce epoch for ``node_id``."""
        store = KeyStore.open(key_dir, kek)
        assert store.directory is not None
        return cls(store, NonceSource.open(store.directory, node_id))

    def _store(self) -> KeyStore:
        if self.keystore is None:
            raise NilKeystoreError()
        return self.keystore

    @property
    def active_key_id(self) -> int:
        return self._store().active_key_id

    def wrap(self, plaintext: bytes) -> bytes:
        store = self._store()
        key_id = store.active_key_id
        if key_id == 0:
            raise UnknownKeyIDError("no active key")
        if self.nonces is None:
            raise NilKeystoreError("no nonce source")
        return env.seal(store.aead(key_id), key_id, self.nonces.next(), plaintext)

    def unwrap(self, data: bytes) -> bytes:
        store = self._store()
        e = env.parse(data)
        return env.open_envelope(e, store.aead(e.key_id))

    # -- keys travelling through the log ---------------------------------------------------------
    def new_sealed_key(self) -> tuple[int, bytes]:
        """A fresh DEK under the next key id, sealed with the KEK; *not* installed here (it is
        installed on every node when the log entry carrying it applies)."""
        store = self._store()
        key_id = store.next_key_id()
        return key_id, seal_dek(store.kek, key_id, secrets.token_bytes(env.KEY_SIZE))

    def active_or_new_sealed_key(self) -> tuple[int, bytes]:
        store = self._store()
        if store.active_key_id:
            return store.active_key_id, store.sealed(store.active_key_id)
        return self.new_sealed_key()

    def install_sealed(self, key_id: int, sealed: bytes, *, activate: bool = True) -> bool:
        return self._store().install_sealed(key_id, sealed, activate=activate)

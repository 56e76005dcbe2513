"""``Cipher``: the key store and the nonce source behind ``wrap`` / ``unwrap``, and the
sealed snapshot payloads (``stream.py``) under the same keys.

    cipher = Cipher.open(key_dir, KEK.from_env("TRIO_RAFT_KEK"), node_id="n1")
    blob = cipher.wrap(b"payload")        # with the active key and a fresh nonce
    cipher.unwrap(blob) == b"payload"      # with whichever key id the envelope names

``node_id`` is the server id string (as ``OpenConfig.local_id``) or its 64-bit node id (as
``OpenConfig.node_id``); anything else is refused at once (``trio_raft/node_ids.py``).

One Cipher per key directory at a time (the nonce epoch is per open; the key file is rewritten
from this object's view). Wrapping, unwrapping and sealing are thread-safe. The cipher counts
what it does (:meth:`Cipher.counters`, for metrics): wraps, unwraps, sealed and opened
snapshot payloads, and the failures of each.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
import weakref
from collections.abc import Iterable
from typing import Any, BinaryIO

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trio_raft.envelope import envelope as env
from trio_raft.envelope import stream
from trio_raft.envelope.keystore import KEK, KeyStore, seal_dek
from trio_raft.envelope.nonce import NonceSource
from trio_raft.errors import NilKeystoreError, SealedSnapshotError, UnknownKeyIDError
from trio_raft.node_ids import node_id_of


@attrs.frozen
class CipherCounts:
    """What a cipher did since it was opened (monotonic counts)."""

    wraps: int = 0
    unwraps: int = 0
    wrap_failures: int = 0
    unwrap_failures: int = 0
    payloads_sealed: int = 0
    payloads_opened: int = 0
    payload_failures: int = 0


_KEY_ID = struct.Struct(">I")
_FIELDS = tuple(attrs.fields_dict(CipherCounts))
_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_WRAPS, _UNWRAPS = _INDEX["wraps"], _INDEX["unwraps"]


class _Counter:
    """Counts without a lock on the hot path: each thread adds to its own tally, a snapshot
    sums them. The tallies of threads that ended are folded into ``_retired`` (so their
    number stays bounded by the live threads)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tallies: list[tuple[weakref.ref[threading.Thread], list[int]]] = []
        self._retired = [0] * len(_FIELDS)

    def _tally(self) -> list[int]:
        try:
            tally: list[int] = self._local.tally
        except AttributeError:
            tally = [0] * len(_FIELDS)
            with self._lock:
                self._fold_ended()
                self._tallies.append((weakref.ref(threading.current_thread()), tally))
            self._local.tally = tally
        return tally

    def add(self, name: str) -> None:
        self.add_at(_INDEX[name])

    def add_at(self, i: int, n: int = 1) -> None:
        try:
            self._local.tally[i] += n
        except AttributeError:
            self._tally()[i] += n

    def _fold_ended(self) -> None:
        live = []
        for ref, tally in self._tallies:
            thread = ref()
            if thread is None or not thread.is_alive():
                for i, v in enumerate(tally):
                    self._retired[i] += v
            else:
                live.append((ref, tally))
        self._tallies = live

    def snapshot(self) -> CipherCounts:
        with self._lock:
            self._fold_ended()
            totals = list(self._retired)
            for _, tally in self._tallies:
                for i, v in enumerate(tally):
                    totals[i] += v
        return CipherCounts(*totals)


@attrs.frozen
class _HotKey:
    aead: AESGCM
    header: bytes
    aad: bytes


class Cipher:
    def __init__(self, keystore: KeyStore | None, nonces: NonceSource | None) -> None:
        self.keystore = keystore
        self.nonces = nonces
        self._counts = _Counter()
        self._hot_keys: dict[int, _HotKey] = {}

    @classmethod
    def open(cls, key_dir: str | os.PathLike[str], kek: KEK, *, node_id: int | str) -> Cipher:
        """Open the key store in ``key_dir`` and bump its nonce epoch for ``node_id`` (the
        server id string, or its 64-bit node id)."""
        nid = node_id_of(node_id, "Cipher.open node_id")
        if not isinstance(kek, KEK):
            raise TypeError(f"Cipher.open needs a KEK (KEK.from_file / KEK.from_env), not "
                            f"{type(kek).__name__}")
        store = KeyStore.open(key_dir, kek)
        assert store.directory is not None
        return cls(store, NonceSource.open(store.directory, nid))

    def _store(self) -> KeyStore:
        if self.keystore is None:
            raise NilKeystoreError()
        return self.keystore

    @property
    def active_key_id(self) -> int:
        return self._store().active_key_id

    @property
    def kek_fingerprint(self) -> str:
        """The fingerprint of the KEK this node's key store is sealed with
        (:attr:`~trio_raft.envelope.KEK.fingerprint`; "" without a key store)."""
        return self.keystore.kek.fingerprint if self.keystore is not None else ""

    def counters(self) -> CipherCounts:
        return self._counts.snapshot()

    def _hot(self, store: KeyStore, key_id: int) -> _HotKey | None:
        """The hot path's view of an installed key (its AEAD, header and AAD), None when the
        key id is not installed. Rebuilt when the store's AEAD object for the id changes."""
        aead = store.cached_aead(key_id)
        if aead is None:
            return None
        hot = self._hot_keys.get(key_id)
        if hot is None or hot.aead is not aead:
            hot = _HotKey(aead, env.header(key_id), env.aad(env.VERSION, key_id))
            self._hot_keys[key_id] = hot
        return hot

    def wrap(self, plaintext: bytes) -> bytes:
        # The hot path (every proposal above the cutover): the active key's AEAD, a nonce,
        # one encryption; the general path below handles (and counts) every failure.
        store, nonces = self.keystore, self.nonces
        if store is not None and nonces is not None:
            hot = self._hot(store, store.active_key_id)
            if hot is not None:
                nonce = nonces.next()
                out = hot.header + nonce + hot.aead.encrypt(nonce, plaintext, hot.aad)
                self._counts.add_at(_WRAPS)
                return out
        try:
            store = self._store()
            key_id = store.active_key_id
            if key_id == 0:
                raise UnknownKeyIDError("no active key")
            if self.nonces is None:
                raise NilKeystoreError("no nonce source")
            out = env.seal(store.aead(key_id), key_id, self.nonces.next(), plaintext)
        except Exception:
            self._counts.add("wrap_failures")
            raise
        self._counts.add("wraps")
        return out

    def wrap_many(self, plaintexts: Iterable[bytes]) -> list[bytes | Exception]:
        """Wrap several payloads in a row, each as :meth:`wrap` would (its own nonce, the key
        active when the call starts): one envelope per payload in order, or the exception
        :meth:`wrap` raises for it. The key, header and AAD are looked up once and the count
        taken once (the engine wraps a run loop batch with it, docs/envelope.md "Cost")."""
        store, nonces = self.keystore, self.nonces
        hot = self._hot(store, store.active_key_id) if store is not None else None
        if hot is None or nonces is None:
            return [self._wrap_or_error(p) for p in plaintexts]
        header, aad, encrypt, next_nonce = hot.header, hot.aad, hot.aead.encrypt, nonces.next
        out: list[bytes | Exception] = []
        failed = 0
        for plaintext in plaintexts:
            try:
                nonce = next_nonce()
                out.append(header + nonce + encrypt(nonce, plaintext, aad))
            except Exception as exc:  # nonces exhausted for good, a payload too large
                self._counts.add("wrap_failures")
                out.append(exc)
                failed += 1
        self._counts.add_at(_WRAPS, len(out) - failed)
        return out

    def _wrap_or_error(self, plaintext: bytes) -> bytes | Exception:
        try:
            return self.wrap(plaintext)
        except Exception as exc:
            return exc

    def unwrap(self, data: bytes) -> bytes:
        store = self.keystore
        if (store is not None and len(data) >= env.OVERHEAD and data[0] == env.VERSION
                and data[1] == env.FLAG):
            hot = self._hot(store, _KEY_ID.unpack_from(data, 2)[0])
            if hot is not None:
                try:
                    out = hot.aead.decrypt(data[6:env.HEADER_SIZE], data[env.HEADER_SIZE:],
                                           hot.aad)
                except InvalidTag:
                    pass  # the general path raises the typed error and counts it
                else:
                    self._counts.add_at(_UNWRAPS)
                    return out
        try:
            store = self._store()
            e = env.parse(data)
            out = env.open_envelope(e, store.aead(e.key_id))
        except Exception:
            self._counts.add("unwrap_failures")
            raise
        self._counts.add("unwraps")
        return out

    def unwrap_batch(self, payloads: Iterable[tuple[int, bytes]]
                     ) -> dict[int, tuple[bytes, bytes]]:
        """Decrypt many envelopes in a row: ``{tag: (envelope, plaintext)}`` for every
        ``(tag, envelope)`` that opens under an installed key (counted as unwraps). The others
        are left out and not counted: :meth:`unwrap` on them raises and counts the failure."""
        out: dict[int, tuple[bytes, bytes]] = {}
        store = self.keystore
        if store is None:
            return out
        hot_keys: dict[int, _HotKey | None] = {}
        header_size, overhead = env.HEADER_SIZE, env.OVERHEAD
        for tag, data in payloads:
            if len(data) < overhead or data[0] != env.VERSION or data[1] != env.FLAG:
                continue
            key_id = _KEY_ID.unpack_from(data, 2)[0]
            if key_id in hot_keys:
                hot = hot_keys[key_id]
            else:
                hot = hot_keys[key_id] = self._hot(store, key_id)
            if hot is None:
                continue
            try:
                plain = hot.aead.decrypt(data[6:header_size], data[header_size:], hot.aad)
            except InvalidTag:
                continue
            out[tag] = (data, plain)
        if out:
            self._counts.add_at(_UNWRAPS, len(out))
        return out

    def try_unwrap(self, data: bytes) -> bytes | None:
        """The plaintext when ``data`` is an envelope that verifies under an installed key,
        else None (nothing counted): how the engine recognises a wrapped payload where it
        expected cleartext."""
        store = self.keystore
        if store is None or len(data) < env.OVERHEAD or data[0] != env.VERSION or data[1]:
            return None
        try:
            e = env.parse(data)
            if e.key_id not in store.key_ids():
                return None
            return env.open_envelope(e, store.aead(e.key_id))
        except Exception:
            return None

    # -- sealed snapshot payloads (stream.py) ------------------------------------------------------
    def seal_payload(self, out: Any, index: int, term: int,
                     chunk_size: int = stream.DEFAULT_CHUNK_SIZE) -> stream.SealingWriter:
        """A :class:`~trio_raft.envelope.stream.SealingWriter` sealing into ``out`` under the
        active key, for the snapshot at ``index``/``term``."""
        try:
            store = self._store()
            key_id = store.active_key_id
            if key_id == 0:
                raise UnknownKeyIDError("no active key to seal a snapshot payload with")
            if self.nonces is None:
                raise NilKeystoreError("no nonce source")
            writer = stream.SealingWriter(out, dek=store.key_bytes(key_id), key_id=key_id,
                                          nonce=self.nonces.next(), index=index, term=term,
                                          chunk_size=chunk_size)
        except Exception:
            self._counts.add("payload_failures")
            raise
        self._counts.add("payloads_sealed")
        return writer

    def open_payload(self, raw: Any, size: int, index: int, term: int,
                     where: str) -> BinaryIO:
        """A plaintext reader over the sealed payload of ``size`` bytes in ``raw``."""
        try:
            reader = stream.open_payload(raw, size, keys=self._store().key_bytes, index=index,
                                         term=term, where=where,
                                         on_failure=self.note_payload_failure)
        except (SealedSnapshotError, NilKeystoreError):
            self._counts.add("payload_failures")
            raise
        self._counts.add("payloads_opened")
        return reader

    def note_payload_failure(self) -> None:
        """Count a sealed payload that failed to verify while it was read."""
        self._counts.add("payload_failures")

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

    def sealed_ring(self) -> tuple[int, tuple[tuple[int, bytes], ...]]:
        """(active key id, every installed key sealed with the KEK): what a snapshot carries."""
        store = self._store()
        return store.active_key_id, tuple((kid, store.sealed(kid)) for kid in store.key_ids())

"""Data keys (DEKs) by id, kept on disk only wrapped by a key-encryption key (KEK).

The KEK is 32 bytes the operator provides from a file or an environment variable they name
(:class:`KEK`); it is never written by trio_raft, and a KEK file inside the key store directory
is refused. DEKs are AES-256 keys, each sealed with PyNaCl's ``SecretBox`` (XSalsa20-Poly1305)
under the KEK together with its key id, so a DEK cannot be re-labelled.

Key store file ``keys.bin`` (all integers big-endian), replaced atomically on every change::

    magic "TRKS" | version u8 (1) | active key id u32 | count u32
    check box (62 bytes: SecretBox of a fixed string; proves the KEK matches the store)
    count x (key id u32 | sealed DEK, 76 bytes)
    crc32 u32 of everything before it

Opening a store with the wrong KEK fails on the check box with :class:`KEKError` naming the
file, before any key is used. The same sealed form (:func:`seal_dek`) is what a rotation entry
carries through the raft log, so every node with the cluster's KEK can install the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import threading
import zlib
from collections.abc import Mapping

import attrs
import nacl.exceptions
import nacl.secret
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trio_raft.envelope.envelope import KEY_SIZE, MAX_KEY_ID, check_key_id
from trio_raft.envelope.errors import (
    KEKError,
    KEKPermissionError,
    KeyConflictError,
    KeyStoreCorruptError,
    KeyStoreError,
)
from trio_raft.errors import UnknownKeyIDError
from trio_raft.storage.fileutil import make_dirs, replace_file

log = logging.getLogger(__name__)

KEY_FILE = "keys.bin"
_MAGIC = b"TRKS"
_HEAD = struct.Struct(">4sBII")
_U32 = struct.Struct(">I")
_CHECK_PLAINTEXT = b"trio-raft-kek-check-v1"
_FINGERPRINT_LABEL = b"trio-raft kek fingerprint v1"
_BOX_OVERHEAD = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES  # 40
CHECK_BOX_SIZE = _BOX_OVERHEAD + len(_CHECK_PLAINTEXT)  # 62
SEALED_DEK_SIZE = _BOX_OVERHEAD + 4 + KEY_SIZE  # 76


@attrs.frozen(repr=False)
class KEK:
    """A key-encryption key and where it came from (for error messages; never the bytes)."""

    key: bytes = attrs.field()
    source: str = "bytes"
    path: str | None = None

    @key.validator
    def _check(self, _attr: object, value: bytes) -> None:
        if len(value) != nacl.secret.SecretBox.KEY_SIZE:
            raise KEKError(f"{self.source}: a KEK is 32 bytes, got {len(value)}")

    def __repr__(self) -> str:
        return f"KEK(source={self.source!r})"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KEK:
        """Read a KEK file: 32 raw bytes, or 64 hex digits, or base64 of 32 bytes.

        The file must be accessible to its owner only (as ssh refuses a private key others can
        read): any permission bit for the group or others is :class:`KEKPermissionError`.
        """
        path = os.path.abspath(os.fspath(path))
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise KEKPermissionError(
                        f"KEK file {path} has mode {stat.S_IMODE(mode):04o}: it must not be "
                        "accessible to group or others (chmod 600 it)")
                raw = f.read()
        except OSError as exc:
            raise KEKError(f"cannot read KEK file {path}: {exc.strerror}") from exc
        return cls(_decode_kek(raw, f"file {path}"), f"file {path}", path)

    @classmethod
    def from_env(cls, name: str) -> KEK:
        """Read a KEK from environment variable ``name`` (64 hex digits or base64)."""
        value = os.environ.get(name)
        if not value:
            raise KEKError(f"environment variable {name} is not set")
        return cls(_decode_kek(value.encode(), f"env {name}"), f"env {name}")

    @classmethod
    def generate(cls) -> KEK:
        return cls(secrets.token_bytes(32), "generated")

    def box(self) -> nacl.secret.SecretBox:
        return nacl.secret.SecretBox(self.key)

    @property
    def fingerprint(self) -> str:
        """16 hex digits that name this KEK without revealing it (a keyed hash of a fixed
        label: HMAC-SHA256), so operators and tools can tell whether two nodes run with the same
        KEK (``kvnode status``; ``encryption enable|rotate`` check every member's)."""
        return hmac.new(self.key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def _decode_kek(raw: bytes, where: str) -> bytes:
    if len(raw) == 32:
        return raw
    text = raw.strip()
    if len(text) == 64:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) == 32:
        return decoded
    raise KEKError(f"{where}: expected 32 raw bytes, 64 hex digits or base64 of 32 bytes")


def seal_dek(kek: KEK, key_id: int, dek: bytes) -> bytes:
    """SecretBox(KEK) over ``key id | DEK``: the only form a DEK takes on disk or in the log."""
    check_key_id(key_id)
    if len(dek) != KEY_SIZE:
        raise ValueError(f"a DEK is {KEY_SIZE} bytes")
    return bytes(kek.box().encrypt(_U32.pack(key_id) + dek))


def open_dek(kek: KEK, key_id: int, sealed: bytes, where: str = "") -> bytes:
    try:
        plain = kek.box().decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise KEKError(
            f"key id {key_id}{where}: the key-encryption key ({kek.source}) does not match "
            "the one this key was sealed with"
        ) from None
    if len(plain) != 4 + KEY_SIZE or _U32.unpack_from(plain)[0] != key_id:
        raise KeyStoreCorruptError(f"sealed key {key_id}{where} carries another key id")
    return plain[4:]


class KeyStore:
    """DEKs by id plus the active id; persisted (sealed) in ``directory/keys.bin``.

    ``directory=None`` keeps everything in memory (tests, tools). Thread-safe.
    """

    def __init__(self, kek: KEK, directory: str | None = None,
                 keys: Mapping[int, bytes] | None = None, active: int = 0) -> None:
        self.kek = kek
        self.directory = directory
        self._keys: dict[int, bytes] = dict(keys or {})
        self._aeads = {kid: AESGCM(k) for kid, k in self._keys.items()}
        self._active = active
        self._lock = threading.Lock()
        #: key id -> (KEK, DEK, that DEK sealed under that KEK): what :meth:`sealed` handed
        #: out, reused while neither changed (every snapshot carries the ring).
        self._sealed: dict[int, tuple[KEK, bytes, bytes]] = {}

    @property
    def path(self) -> str | None:
        return None if self.directory is None else os.path.join(self.directory, KEY_FILE)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], kek: KEK) -> KeyStore:
        """Open (creating when absent) the store in ``directory``; KEKError on a wrong KEK."""
        directory = os.path.abspath(os.fspath(directory))
        if kek.path is not None and os.path.commonpath([kek.path, directory]) == directory:
            raise KEKError(f"the KEK file {kek.path} must not live inside the key store "
                           f"directory {directory}")
        make_dirs(directory)
        store = cls(kek, directory)
        path = store.path
        assert path is not None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            store._persist()
            return store
        store._keys, store._active = decode_store(data, kek, path)
        store._aeads = {kid: AESGCM(k) for kid, k in store._keys.items()}
        log.info("key store %s: %d key(s), active id %d", path, len(store._keys), store._active)
        return store

    # -- reading -------------------------------------------------------------------------------
    @property
    def active_key_id(self) -> int:
        return self._active

    def key_ids(self) -> list[int]:
        return sorted(self._keys)

    def aead(self, key_id: int) -> AESGCM:
        try:
            return self._aeads[key_id]
        except KeyError:
            check_key_id(key_id)
            raise UnknownKeyIDError(f"key id {key_id}") from None

    def cached_aead(self, key_id: int) -> AESGCM | None:
        """The AEAD of an installed key id, None otherwise (no error: the hot path's test)."""
        return self._aeads.get(key_id)

    def key_bytes(self, key_id: int) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            check_key_id(key_id)
            raise UnknownKeyIDError(f"key id {key_id}") from None

    def next_key_id(self) -> int:
        nxt = max(self._keys, default=0) + 1
        if nxt > MAX_KEY_ID:
            raise KeyStoreError("no key ids left")
        return nxt

    # -- changing ------------------------------------------------------------------------------
    def install(self, key_id: int, dek: bytes, *, activate: bool = True) -> bool:
        """Add ``dek`` under ``key_id`` (idempotent for the same bytes) and maybe make it active.

        Returns whether anything changed. KeyConflictError when the id holds other material.
        """
        check_key_id(key_id)
        if len(dek) != KEY_SIZE:
            raise ValueError(f"a DEK is {KEY_SIZE} bytes")
        with self._lock:
            old = self._keys.get(key_id)
            if old is not None and not secrets.compare_digest(old, dek):
                raise KeyConflictError(f"key id {key_id}")
            changed = old is None or (activate and self._active != key_id)
            if not changed:
                return False
            self._keys[key_id] = bytes(dek)
            self._aeads[key_id] = AESGCM(dek)
            if activate:
                self._active = key_id
            self._persist()
        log.info("key store: installed key id %d%s", key_id, " (active)" if activate else "")
        return True

    def install_sealed(self, key_id: int, sealed: bytes, *, activate: bool = True) -> bool:
        """Install a KEK-sealed key (a control record's, a snapshot key ring's).

        A key id already installed is not opened again when the sealed form cannot be opened
        with this store's KEK: after a KEK rotation the log and older snapshots still carry
        keys sealed with the previous KEK, and replaying them must change nothing (the key is
        only activated when asked). A key id that is not installed needs this KEK."""
        try:
            dek = open_dek(self.kek, key_id, sealed)
        except KEKError:
            if key_id not in self._keys:
                raise
            log.info("key id %d: sealed under another KEK; the installed key is kept", key_id)
            return self.activate(key_id) if activate else False
        return self.install(key_id, dek, activate=activate)

    def activate(self, key_id: int) -> bool:
        """Make the installed ``key_id`` the active key; returns whether that changed."""
        with self._lock:
            if key_id not in self._keys:
                check_key_id(key_id)
                raise UnknownKeyIDError(f"key id {key_id}")
            if self._active == key_id:
                return False
            self._active = key_id
            self._persist()
        return True

    def rekey(self, new_kek: KEK) -> None:
        """Re-seal every data key (and the check value) under ``new_kek`` and replace the key
        file atomically: a crash leaves the old file (old KEK) or the new one (new KEK), never
        a mix. The data keys themselves do not change, so nothing in the raft log or in sealed
        snapshots needs rewriting."""
        if new_kek.path is not None and self.directory is not None and os.path.commonpath(
                [new_kek.path, self.directory]) == self.directory:
            raise KEKError(f"the KEK file {new_kek.path} must not live inside the key store "
                           f"directory {self.directory}")
        with self._lock:
            old = self.kek
            self.kek = new_kek
            try:
                self._persist()
            except BaseException:
                self.kek = old
                raise
        log.info("key store %s: %d key(s) re-sealed under %s", self.path, len(self._keys),
                 new_kek.source)

    def sealed(self, key_id: int) -> bytes:
        """The DEK of ``key_id`` sealed under the current KEK (the same bytes on every call
        while the KEK and the key stay: a sealed DEK may be stored any number of times)."""
        kek, dek = self.kek, self.key_bytes(key_id)
        cached = self._sealed.get(key_id)
        if cached is not None and cached[0] is kek and cached[1] == dek:
            return cached[2]
        sealed = seal_dek(kek, key_id, dek)
        self._sealed[key_id] = (kek, dek, sealed)
        return sealed

    def _persist(self) -> None:
        if self.directory is None:
            return
        path = self.path
        assert path is not None
        replace_file(path, encode_store(self.kek, self._keys, self._active))


def encode_store(kek: KEK, keys: Mapping[int, bytes], active: int) -> bytes:
    parts = [_HEAD.pack(_MAGIC, 1, active, len(keys)), bytes(kek.box().encrypt(_CHECK_PLAINTEXT))]
    for kid in sorted(keys):
        parts.append(_U32.pack(kid) + seal_dek(kek, kid, keys[kid]))
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def decode_store(data: bytes, kek: KEK, path: str) -> tuple[dict[int, bytes], int]:
    if len(data) < _HEAD.size + CHECK_BOX_SIZE + 4:
        raise KeyStoreCorruptError(f"{path}: {len(data)} bytes")
    body, (crc,) = data[:-4], _U32.unpack_from(data, len(data) - 4)
    if zlib.crc32(body) != crc:
        raise KeyStoreCorruptError(f"{path}: checksum mismatch")
    magic, version, active, count = _HEAD.unpack_from(body)
    if magic != _MAGIC or version != 1:
        raise KeyStoreCorruptError(f"{path}: bad magic or version")
    if len(body) != _HEAD.size + CHECK_BOX_SIZE + count * (4 + SEALED_DEK_SIZE):
        raise KeyStoreCorruptError(f"{path}: length does not match {count} key(s)")
    off = _HEAD.size
    try:
        kek.box().decrypt(body[off:off + CHECK_BOX_SIZE])
    except nacl.exceptions.CryptoError:
        raise KEKError(f"the key-encryption key ({kek.source}) does not match the key store "
                       f"{path}") from None
    off += CHECK_BOX_SIZE
    keys: dict[int, bytes] = {}
    for _ in range(count):
        (kid,) = _U32.unpack_from(body, off)
        keys[kid] = open_dek(kek, kid, body[off + 4:off + 4 + SEALED_DEK_SIZE], f" in {path}")
        off += 4 + SEALED_DEK_SIZE
    if active and active not in keys:
        raise KeyStoreCorruptError(f"{path}: active key id {active} is not stored")
    return keys, active


def rotate_kek(directory: str | os.PathLike[str], old: KEK, new: KEK) -> KeyStore:
    """Open the key store in ``directory`` with ``old`` and re-seal it under ``new``
    (:meth:`KeyStore.rekey`); KEKError when ``old`` does not open it. Run it on a stopped node:
    a running node rewrites the file with the KEK it was started with."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, KEY_FILE)
    if not os.path.exists(path):
        raise KeyStoreError(f"no key store in {directory} ({KEY_FILE} is missing)")
    store = KeyStore.open(directory, old)
    store.rekey(new)
    return store

"""``kvnode snapshot save``, ``kvnode snapshot restore`` and ``kvnode recover``
(docs/operations.md: backup, restore, recovery from lost quorum).

* ``snapshot save FILE --addr HOST:PORT``: asks the leader for a backup (the Admin ``Backup``
  call: a linearizable read, then ``Engine.export_snapshot``), writes it to ``FILE.tmp-*``,
  fsyncs, checks it whole (``trio_raft.storage.backup.verify_backup``), renames it to ``FILE``
  and fsyncs the directory; prints the index, term, number of keys and bytes.
* ``snapshot restore FILE --data-dir DIR --id ID --peers ... [--key-dir --kek-file]``:
  prepares an empty data dir from the backup (a sealed backup, written while the envelope was
  on, needs the key store and KEK flags) (``trio_raft.storage.restore.restore_backup``);
  ``serve`` with the same ``--id`` and ``--peers`` then starts a new cluster holding exactly
  that data. Every member is restored from the same file with the same ``--peers``.
* ``recover --data-dir DIR --id ID --peers ...``: rewrites a stopped survivor as a new cluster of
  ``--peers`` (``trio_raft.storage.restore.recover_cluster``); refuses while the node runs.

Failures are raised and mapped to the exit-code table by :mod:`trio_raft_kv.cli`: a refused data
dir, a running node or unusable peers exit 2 (usage), a damaged backup 7 (failed), a server's
answer as for every client command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import struct
import uuid
from typing import Any

import trio_raft
from trio_raft.engine.membership import to_persisted
from trio_raft.envelope import Cipher
from trio_raft.errors import BackupFileError, KEKError
from trio_raft.storage.backup import (
    BackupInfo,
    open_sealed_payload,
    read_backup_info,
    verify_backup,
)
from trio_raft.storage.restore import recover_cluster, restore_backup
from trio_raft_kv.client import KVClient
from trio_raft_kv.encryption import open_cipher
from trio_raft_kv.statemachine import SNAPSHOT_MAGIC, SNAPSHOT_MAGIC_V1

_PREFIX = struct.Struct(">4sBBHI")


def backup_keys(path: str, cipher: Cipher | None = None) -> int | None:
    """The number of keys in the KV payload of the backup at ``path`` (its header says it);
    None for a sealed backup when no ``cipher`` is given to open it."""
    info = read_backup_info(path)
    if info.sealed:
        if cipher is None:
            return None
        got: list[bytes] = []
        open_sealed_payload(path, info, cipher, lambda r: got.append(r.read(12)))
        head = got[0]
    else:
        with open(path, "rb") as f:
            _magic, _version, _flags, _res, hlen = _PREFIX.unpack(f.read(_PREFIX.size))
            f.seek(_PREFIX.size + hlen)
            head = f.read(12)
    if len(head) == 12 and head[:4] in (SNAPSHOT_MAGIC, SNAPSHOT_MAGIC_V1):
        return int(struct.unpack(">Q", head[4:])[0])
    if not head:
        return 0
    raise BackupFileError(f"{path}: the payload is not a kvnode snapshot")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def save(args: argparse.Namespace, client: KVClient) -> tuple[BackupInfo, int | None]:
    """Fetch a backup into ``args.file`` atomically; returns what it holds and its keys."""
    final = os.path.abspath(args.file)
    directory = os.path.dirname(final)
    tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            await client.backup(f.write)
            f.flush()
            os.fsync(f.fileno())
        info = verify_backup(tmp)
        keys = backup_keys(tmp)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return info, keys


def _peers(args: argparse.Namespace) -> list[Any]:
    peers = trio_raft.parse_peers(args.peers)
    if args.id not in {p.id for p in peers}:
        raise trio_raft.errors.LocalPeerMissingError(f"--id {args.id} is not in --peers")
    return to_persisted(peers)


def restore(args: argparse.Namespace) -> dict[str, Any]:
    """Restore a data dir from a backup; a sealed one (docs/envelope.md) needs the node's key
    store and the cluster's KEK (``--key-dir``, ``--kek-file``/``--kek-env``): the backup's
    key ring is installed into the key store, every chunk is verified, and the payload stays
    sealed in the restored data dir."""
    peers = _peers(args)
    cipher = open_cipher(args)
    header = read_backup_info(args.file)
    if header.sealed:
        if cipher is None:
            raise KEKError(f"{args.file} is a sealed backup: give --key-dir and --kek-file "
                           "(or --kek-env) to restore it")
        ring = header.envelope.key_ring
        for key_id, sealed in ring.keys if ring is not None else ():
            cipher.install_sealed(key_id, sealed, activate=False)  # KEKError: a wrong KEK
        if ring is not None and ring.active and not cipher.active_key_id:
            cipher.install_sealed(ring.active, dict(ring.keys)[ring.active], activate=True)
    info = restore_backup(args.file, args.data_dir, peers, cipher=cipher)
    return {"ok": True, "index": info.index, "term": info.term,
            "keys": backup_keys(args.file, cipher), "bytes": info.file_bytes,
            "sealed": info.sealed, "data_dir": args.data_dir}


def recover(args: argparse.Namespace) -> dict[str, Any]:
    info = recover_cluster(args.data_dir, _peers(args), local_id=args.id)
    return {"ok": True, "last_index": info.last_index, "previous_commit": info.previous_commit,
            "removed": len(info.removed), "cluster_id": info.cluster_id}

"""kvnode and the raft envelope: the key flags, ``encryption enable|rotate|rotate-kek``.

* ``serve --key-dir DIR --kek-file FILE`` (or ``--kek-env NAME``): :func:`open_cipher` opens
  the node's key store with the KEK *before* anything is served; a wrong KEK, a KEK file that
  its group or others can read, or a damaged key store is the key store's own error
  (:class:`~trio_raft.errors.KeyStoreError`, exit code 2) and the node does not start. The
  cipher becomes ``OpenConfig.raft_cipher`` and the SQLite store's value sealer.
* ``encryption enable --addr``: the cutover on the leader (answers the cutover index), then,
  unless ``--no-compact``, a ``Compact`` call on every member (each waits until it has
  applied the cutover, then snapshots and drops every log entry and older snapshot below:
  no entry written before the cutover stays on any disk).
* ``encryption rotate --addr``: a new data key, replicated and made active on every node.
* Before either, every member is asked for its status: each must run with a key store sealed
  under the same KEK as the leader (the same KEK fingerprint), because the new data key
  travels through the log sealed under the leader's KEK and a node that cannot open it stops
  (a KEK rotation half done, a node started without ``--key-dir``). Otherwise nothing is
  proposed and the command exits 3 naming the members; ``--force`` skips the check.
* ``encryption rotate-kek --key-dir --kek-file --new-kek-file`` (a stopped node): every data
  key re-sealed under the new KEK, the key file replaced atomically; the log is not touched.

The whole runbook is in docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from grpclib.const import Status

from trio_raft.envelope import KEK, Cipher
from trio_raft.envelope.keystore import rotate_kek
from trio_raft_kv.client import KVClient, KVError


def kek_from_args(args: argparse.Namespace) -> KEK | None:
    """The KEK named by ``--kek-file`` / ``--kek-env`` (None when neither is given)."""
    if getattr(args, "kek_file", None):
        return KEK.from_file(args.kek_file)
    if getattr(args, "kek_env", None):
        return KEK.from_env(args.kek_env)
    return None


def open_cipher(args: argparse.Namespace) -> Cipher | None:
    """This node's cipher from ``--key-dir`` and the KEK (None without ``--key-dir``)."""
    key_dir = getattr(args, "key_dir", None)
    if not key_dir:
        return None
    kek = kek_from_args(args)
    assert kek is not None  # the parser requires a KEK with --key-dir
    return Cipher.open(key_dir, kek, node_id=args.id)


def _out(args: argparse.Namespace, human: str, obj: dict[str, Any]) -> None:
    print(json.dumps(obj) if args.json else human, flush=True)


async def check_same_kek(client: KVClient) -> None:
    """Return when every member reports the leader's KEK fingerprint; else KVError
    (FAILED_PRECONDITION) naming the members that differ, run without a key store, or do not
    answer."""
    members = (await client.members()).members  # the leader's view (follows a redirect)
    leader_id = (await client.status()).leader_id
    prints: dict[str, str] = {}
    problems: list[str] = []
    for m in members:
        try:
            prints[m.id] = (await client.status(m.address)).kek_fingerprint
        except KVError as exc:
            problems.append(f"{m.id} at {m.address} did not answer ({exc.message})")
    expected = prints.get(leader_id, "")
    for node, fingerprint in prints.items():
        if not fingerprint:
            problems.append(f"{node} runs without a key store (--key-dir)")
        elif expected and fingerprint != expected:
            problems.append(f"{node} runs with KEK {fingerprint}, the leader {leader_id} with "
                            f"{expected}")
    if leader_id not in prints and len({fp for fp in prints.values() if fp}) > 1:
        problems.append("members run with different KEKs: " + ", ".join(
            f"{node} {fp}" for node, fp in sorted(prints.items()) if fp))
    if problems:
        raise KVError(Status.FAILED_PRECONDITION,
                      "every member must run with the same KEK before keys travel through the "
                      "log (docs/operations.md, \"Rotate the KEK\"): " + "; ".join(problems)
                      + "; nothing was changed (--force skips this check)", sent=False)


async def encryption_command(args: argparse.Namespace, client: KVClient) -> int:
    """``encryption enable`` and ``encryption rotate`` (client commands)."""
    if not args.force:
        await check_same_kek(client)
    if args.action == "rotate":
        r = await client.encryption_rotate()
        _out(args, f"OK rotated: active key id {r.active_key_id} (cutover index "
                   f"{r.cutover_index})",
             {"ok": True, "active_key_id": r.active_key_id, "cutover_index": r.cutover_index})
        return 0
    r = await client.encryption_enable()
    compacted: dict[str, int] = {}
    if not args.no_compact:
        members = await client.members()
        for m in members.members:
            try:
                compacted[m.id] = (await client.compact(m.address, r.cutover_index)).index
            except KVError as exc:
                # The cutover stands; the member keeps earlier entries until it compacts.
                raise KVError(exc.status, f"enabled (cutover index {r.cutover_index}), but "
                              f"compacting {m.id} at {m.address} failed: {exc.message}",
                              address=exc.address, sent=exc.sent) from exc
    _out(args, f"OK enabled: cutover index {r.cutover_index}, active key id "
               f"{r.active_key_id}"
               + (f"; compacted {', '.join(f'{k}@{v}' for k, v in compacted.items())}"
                  if compacted else ""),
         {"ok": True, "cutover_index": r.cutover_index, "active_key_id": r.active_key_id,
          "compacted": compacted})
    return 0


def rotate_kek_command(args: argparse.Namespace) -> dict[str, Any]:
    """``encryption rotate-kek`` on a stopped node's key store."""
    old, new = KEK.from_file(args.kek_file), KEK.from_file(args.new_kek_file)
    store = rotate_kek(args.key_dir, old, new)
    return {"ok": True, "key_dir": args.key_dir, "keys": len(store.key_ids()),
            "active_key_id": store.active_key_id}

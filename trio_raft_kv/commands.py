"""The client and admin commands of ``kvnode`` (``put``, ``get``, ..., ``transfer``).

Each command makes its calls with a :class:`~trio_raft_kv.client.KVClient` and prints its
result (one JSON object with ``--json``). It returns 0 when the operation did what was asked,
or the not-found code (a missing key, a CAS that did not swap); every failure is raised, and
:func:`trio_raft_kv.cli.main` turns it into the exit code of docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import json
from collections.abc import Awaitable, Callable
from typing import Any

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.cli import ExitCode
from trio_raft_kv.client import KVClient, KVError, client_ssl
from trio_raft_kv.errors import InvalidFieldError

#: The exit codes a command returns itself (the others come from what it raises).
OK, NOT_FOUND = ExitCode.OK, ExitCode.NOT_FOUND
#: Seconds between two ``promote`` attempts while the learner catches up (a retry of a
#: refusal: the leader answers at once whether the learner has caught up).
PROMOTE_RETRY = 0.2


def _value(args: argparse.Namespace, text: str) -> bytes:
    if not args.hex:
        return text.encode("utf-8")
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise InvalidFieldError(f"--hex: {text!r} is not an even number of hex digits") from None


def _show(args: argparse.Namespace, value: bytes) -> str:
    return value.hex() if args.hex else value.decode("utf-8", errors="backslashreplace")


def _out(args: argparse.Namespace, human: str, obj: dict[str, Any]) -> None:
    print(json.dumps(obj) if args.json else human, flush=True)


async def run_client_command(args: argparse.Namespace) -> int:
    """Run ``args.command`` against ``args.addr``."""
    handler = HANDLERS[args.command]
    client = KVClient(args.addr, ssl_context=client_ssl(args.tls_dir), timeout=args.timeout)
    try:
        return await handler(args, client)
    finally:
        client.close()


async def _put(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.put(args.key, _value(args, args.value))
    _out(args, f"OK index={r.index}", {"ok": True, "index": r.index})
    return OK


async def _get(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.get(args.key, pb.ReadMode[args.mode.upper()])
    _out(args, _show(args, r.value) if r.found else "(not found)",
         {"found": r.found, "value": _show(args, r.value), "index": r.index})
    return OK if r.found else NOT_FOUND


async def _delete(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.delete(args.key)
    _out(args, f"{'deleted' if r.deleted else 'not found'} index={r.index}",
         {"deleted": r.deleted, "index": r.index})
    return OK if r.deleted else NOT_FOUND


async def _cas(args: argparse.Namespace, c: KVClient) -> int:
    expected = b"" if args.expect_absent else _value(args, args.expected)
    r = await c.cas(args.key, _value(args, args.value), expected=expected,
                    expect_absent=args.expect_absent)
    cur = _show(args, r.current) if r.found else "(absent)"
    _out(args, f"{'swapped' if r.swapped else 'not swapped'} (was {cur}) index={r.index}",
         {"swapped": r.swapped, "found": r.found, "current": _show(args, r.current),
          "index": r.index})
    return OK if r.swapped else NOT_FOUND


async def _status(args: argparse.Namespace, c: KVClient) -> int:
    st = await c.status()
    try:
        members = [{"id": m.id, "address": m.address, "suffrage": m.suffrage}
                   for m in (await c.members()).members]
    except KVError:
        members = []  # a node that cannot say (no leader yet): its own status still stands
    obj = {"id": st.id, "state": st.state, "leader_id": st.leader_id,
           "leader_address": st.leader_address, "term": st.term,
           "commit_index": st.commit_index, "applied_index": st.applied_index,
           "members": members,
           "encryption": {"on": st.envelope_on, "active_key_id": st.active_key_id,
                          "cutover_index": st.cutover_index or None,
                          "kek": st.kek_fingerprint or None}}
    envelope = (f"encryption=on key={st.active_key_id} cutover={st.cutover_index}"
                if st.envelope_on else "encryption=off")
    if st.kek_fingerprint:
        envelope += f" kek={st.kek_fingerprint}"

    human = (f"{st.id}: {st.state} term={st.term} commit={st.commit_index} "
             f"applied={st.applied_index} leader={st.leader_id or '?'}"
             f"@{st.leader_address or '?'} {envelope}\n"
             + "\n".join(f"  {m['id']} {m['address']} {m['suffrage']}" for m in members))
    _out(args, human.rstrip(), obj)
    return OK


def _admin_done(args: argparse.Namespace, what: str, r: pb.AdminResponse) -> int:
    _out(args, f"OK {what} index={r.index}", {"ok": True, "index": r.index})
    return OK


async def _add_learner(args: argparse.Namespace, c: KVClient) -> int:
    return _admin_done(args, "added learner", await c.add_learner(args.id, args.address))


async def _promote(args: argparse.Namespace, c: KVClient) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    while True:
        try:
            r = await c.promote(args.id)
        except KVError as exc:
            if "NotCaughtUp" in exc.message and loop.time() < deadline:
                await asyncio.sleep(PROMOTE_RETRY)
                continue
            raise
        return _admin_done(args, "promoted", r)


async def _remove(args: argparse.Namespace, c: KVClient) -> int:
    return _admin_done(args, "removed", await c.remove(args.id))


async def _transfer(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.transfer(args.to)
    _out(args, f"OK transferred leadership (was {r.leader_id})", {"ok": True})
    return OK


async def _snapshot(args: argparse.Namespace, c: KVClient) -> int:
    from trio_raft_kv.backups import save

    info, keys = await save(args, c)
    shown = "sealed" if keys is None else keys
    _out(args, f"OK saved {args.file}: index={info.index} term={info.term} keys={shown} "
               f"bytes={info.file_bytes}",
         {"ok": True, "file": args.file, "index": info.index, "term": info.term,
          "keys": keys, "sealed": info.sealed, "bytes": info.file_bytes})
    return OK


async def _encryption(args: argparse.Namespace, c: KVClient) -> int:
    from trio_raft_kv.encryption import encryption_command

    return await encryption_command(args, c)


def run_offline_command(args: argparse.Namespace) -> int:
    """``snapshot restore`` and ``recover``: on a stopped node's files, no server."""
    from trio_raft_kv import backups

    if args.command == "encryption":
        from trio_raft_kv.encryption import rotate_kek_command

        obj = rotate_kek_command(args)
        _out(args, f"OK re-sealed {obj['keys']} key(s) in {args.key_dir} under the new KEK",
             obj)
        return OK
    if args.command == "recover":
        obj = backups.recover(args)
        human = (f"OK recovered {args.data_dir} as a new cluster {obj['cluster_id']}: "
                 f"{obj['last_index']} entries kept (commit was {obj['previous_commit']}), "
                 f"{obj['removed']} member(s) removed; start it with serve")
    else:
        obj = backups.restore(args)
        human = (f"OK restored {args.file} into {args.data_dir}: index={obj['index']} "
                 f"term={obj['term']} keys={obj['keys']} bytes={obj['bytes']}"
                 + (" (sealed)" if obj.get("sealed") else ""))
    _out(args, human, obj)
    return OK


HANDLERS: dict[str, Callable[[argparse.Namespace, KVClient], Awaitable[int]]] = {
    "put": _put, "get": _get, "delete": _delete, "cas": _cas, "status": _status,
    "add-learner": _add_learner, "promote": _promote, "remove": _remove,
    "transfer": _transfer, "snapshot": _snapshot, "encryption": _encryption,
}

"""The kvnode command line: ``serve``, client commands, admin commands and ``demo``.

Client and admin commands exit 0 on success, 1 when a key is not found or a CAS did not swap,
3 when the call failed (the gRPC status and message go to stderr), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.client import KVClient, KVError, client_ssl

EXIT_MISS, EXIT_RPC = 1, 3
PROMOTE_RETRY = 0.2


def _add_client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default="127.0.0.1:7001", help="any node's HOST:PORT")
    p.add_argument("--tls-dir", default=None, help="ca.crt, node.crt, node.key for mutual TLS")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hex", action="store_true", help="values are given and printed as hex")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvnode.py", description="A replicated key/value service on trio_raft.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run one node until SIGINT/SIGTERM")
    s.add_argument("--id", required=True, help="this node's id, e.g. n1")
    s.add_argument("--listen", required=True, help="HOST:PORT to serve raft + KV on")
    s.add_argument("--peers", default="",
                   help="n1=HOST:PORT,n2=...: how this node reaches each member")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--bootstrap", action="store_true",
                   help="form the cluster from --peers (only acts on an empty data dir)")
    s.add_argument("--join-as-learner", action="store_true",
                   help="start empty and wait to be added with add-learner")
    s.add_argument("--snapshot-every", type=int, default=10_000,
                   help="take a state machine snapshot every N applied entries")
    s.add_argument("--tls-dir", default=None,
                   help="mutual TLS: DIR/ca.crt, DIR/node.crt, DIR/node.key")
    s.add_argument("--metrics-listen", default=None,
                   help="HOST:PORT for Prometheus text exposition (/metrics)")
    s.add_argument("--tick-interval", type=float, default=0.01, help="seconds per raft tick")
    s.add_argument("--heartbeat-tick", type=int, default=10)
    s.add_argument("--election-tick", type=int, default=100)
    s.add_argument("--log-level", default="warning")
    # Tests only (tests/chaos): a file holding the seconds to wait before each WAL write,
    # re-read every time, so a test can make the disk slow and fast again at run time.
    s.add_argument("--test-fsync-delay-file", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("put", help="set KEY to VALUE")
    p.add_argument("key")
    p.add_argument("value")
    _add_client_opts(p)
    p = sub.add_parser("get", help="read KEY")
    p.add_argument("key")
    p.add_argument("--mode", choices=["linearizable", "lease", "local"], default="linearizable")
    _add_client_opts(p)
    p = sub.add_parser("delete", help="delete KEY")
    p.add_argument("key")
    _add_client_opts(p)
    p = sub.add_parser("cas", help="set KEY to VALUE if it currently equals --expected")
    p.add_argument("key")
    p.add_argument("value")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--expected")
    g.add_argument("--expect-absent", action="store_true")
    _add_client_opts(p)
    p = sub.add_parser("status", help="one node's raft status (and the members)")
    _add_client_opts(p)

    p = sub.add_parser("add-learner", help="add a node as a non-voting learner")
    p.add_argument("id")
    p.add_argument("address", help="HOST:PORT the members reach the new node at")
    _add_client_opts(p)
    p = sub.add_parser("promote", help="make a caught-up learner a voter")
    p.add_argument("id")
    p.add_argument("--wait", type=float, default=30.0,
                   help="keep retrying while the learner catches up, seconds")
    _add_client_opts(p)
    p = sub.add_parser("remove", help="remove a member")
    p.add_argument("id")
    _add_client_opts(p)
    p = sub.add_parser("transfer", help="hand leadership to another voter")
    p.add_argument("--to", default="", help="target id (default: the engine picks)")
    _add_client_opts(p)

    d = sub.add_parser("demo", help="run a local 3-node cluster through a failover")
    d.add_argument("--duration", type=float, default=20.0,
                   help="seconds of client load in total (default 20)")
    d.add_argument("--clients", type=int, default=16, help="concurrent client tasks")
    d.add_argument("--keep-dir", action="store_true", help="keep the data dirs and logs")
    return parser


def _value(args: argparse.Namespace, text: str) -> bytes:
    return binascii.unhexlify(text) if args.hex else text.encode("utf-8")


def _show(args: argparse.Namespace, value: bytes) -> str:
    return value.hex() if args.hex else value.decode("utf-8", errors="backslashreplace")


def _out(args: argparse.Namespace, human: str, obj: dict[str, Any]) -> None:
    print(json.dumps(obj) if args.json else human, flush=True)


async def _client_command(args: argparse.Namespace) -> int:
    client = KVClient(args.addr, ssl_context=client_ssl(args.tls_dir), timeout=args.timeout)
    try:
        handler: Callable[[argparse.Namespace, KVClient], Awaitable[int]] = _HANDLERS[
            args.command]
        return await handler(args, client)
    except KVError as exc:
        print(f"error: {exc}" + (f"; leader is at {exc.leader_address}"
                                 if exc.leader_address else ""), file=sys.stderr)
        return EXIT_RPC
    finally:
        client.close()


async def _put(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.put(args.key, _value(args, args.value))
    _out(args, f"OK index={r.index}", {"ok": True, "index": r.index})
    return 0


async def _get(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.get(args.key, pb.ReadMode[args.mode.upper()])
    _out(args, _show(args, r.value) if r.found else "(not found)",
         {"found": r.found, "value": _show(args, r.value), "index": r.index})
    return 0 if r.found else EXIT_MISS


async def _delete(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.delete(args.key)
    _out(args, f"{'deleted' if r.deleted else 'not found'} index={r.index}",
         {"deleted": r.deleted, "index": r.index})
    return 0 if r.deleted else EXIT_MISS


async def _cas(args: argparse.Namespace, c: KVClient) -> int:
    expected = b"" if args.expect_absent else _value(args, args.expected)
    r = await c.cas(args.key, _value(args, args.value), expected=expected,
                    expect_absent=args.expect_absent)
    cur = _show(args, r.current) if r.found else "(absent)"
    _out(args, f"{'swapped' if r.swapped else 'not swapped'} (was {cur}) index={r.index}",
         {"swapped": r.swapped, "found": r.found, "current": _show(args, r.current),
          "index": r.index})
    return 0 if r.swapped else EXIT_MISS


async def _status(args: argparse.Namespace, c: KVClient) -> int:
    st = await c.status()
    try:
        members = [{"id": m.id, "address": m.address, "suffrage": m.suffrage}
                   for m in (await c.members()).members]
    except KVError:
        members = []
    obj = {"id": st.id, "state": st.state, "leader_id": st.leader_id,
           "leader_address": st.leader_address, "term": st.term,
           "commit_index": st.commit_index, "applied_index": st.applied_index,
           "members": members}
    human = (f"{st.id}: {st.state} term={st.term} commit={st.commit_index} "
             f"applied={st.applied_index} leader={st.leader_id or '?'}"
             f"@{st.leader_address or '?'}\n"
             + "\n".join(f"  {m['id']} {m['address']} {m['suffrage']}" for m in members))
    _out(args, human.rstrip(), obj)
    return 0


async def _admin_done(args: argparse.Namespace, what: str, r: pb.AdminResponse) -> int:
    _out(args, f"OK {what} index={r.index}", {"ok": True, "index": r.index})
    return 0


async def _add_learner(args: argparse.Namespace, c: KVClient) -> int:
    return await _admin_done(args, "added learner", await c.add_learner(args.id, args.address))


async def _promote(args: argparse.Namespace, c: KVClient) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    while True:
        try:
            r = await c.promote(args.id)
        except KVError as exc:
            if "NotCaughtUp" in exc.message and loop.time() < deadline:
                await asyncio.sleep(PROMOTE_RETRY)  # a retry interval, not a wait for a state
                continue
            raise
        return await _admin_done(args, "promoted", r)


async def _remove(args: argparse.Namespace, c: KVClient) -> int:
    return await _admin_done(args, "removed", await c.remove(args.id))


async def _transfer(args: argparse.Namespace, c: KVClient) -> int:
    r = await c.transfer(args.to)
    _out(args, f"OK transferred leadership (was {r.leader_id})", {"ok": True})
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, KVClient], Awaitable[int]]] = {
    "put": _put, "get": _get, "delete": _delete, "cas": _cas, "status": _status,
    "add-learner": _add_learner, "promote": _promote, "remove": _remove,
    "transfer": _transfer,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from trio_raft_kv.serve import serve_main

        return serve_main(args)
    if args.command == "demo":
        from trio_raft_kv.demo import demo_main

        return demo_main(args)
    return asyncio.run(_client_command(args))

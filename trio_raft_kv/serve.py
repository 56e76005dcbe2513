"""``kvnode serve``: one replicated KV node (raft transport + KV + Admin on one port).

Lifecycle: check the bootstrap guard (below), start the gRPC transport with the KV and Admin
services on ``--listen``, open the engine on ``--data-dir`` with that transport, serve until
SIGINT/SIGTERM (or until this node is removed from the cluster), then close the engine, the
transport and the metrics endpoint, and return 0. Failures are raised, not printed: the command
line maps them to its exit codes (:mod:`trio_raft_kv.cli`, docs/operations.md).

Bootstrap guard: ``--bootstrap`` only acts on an empty data dir. Every node, once it holds data,
records in the replicated state that it has been a member (:class:`MembershipAnnouncer`). A
node started with ``--bootstrap`` on an empty data dir first asks its peers; if any of them
remembers it, its data dir was wiped, and it refuses to start
(:class:`~trio_raft_kv.errors.StartRefusedError`) instead of rejoining with a forgotten vote and
log: remove it and add it back as a learner (``--join-as-learner``), see docs/operations.md.

Join discovery: a node started with ``--join-as-learner`` on an empty data dir asks the peers
it lists for the membership (``Members``) and adds the members it was not told of, with their
addresses, to its ``--peers`` (its own entries win). Until a snapshot naming every member
reaches it, those addresses are the only way it can answer a leader it was not told of.

Encryption at rest (``--key-dir`` with ``--kek-file`` or ``--kek-env``): the node's key store
is opened with the KEK before anything else (``trio_raft_kv/encryption.py``; a wrong KEK is
the key store's error and nothing is served); its cipher is the engine's ``raft_cipher`` and
the SQLite store's value sealer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

import trio_raft
from trio_raft.envelope import Cipher
from trio_raft.transport.grpc import GRPCTransport
from trio_raft_kv.client import KVClient, KVError, client_ssl, tls_paths
from trio_raft_kv.encryption import open_cipher
from trio_raft_kv.errors import StartRefusedError, TLSFilesError
from trio_raft_kv.limits import server_limits
from trio_raft_kv.metrics import Metrics
from trio_raft_kv.services import (
    AdminService,
    KVService,
    ServiceContext,
    remove_stale_backups,
)
from trio_raft_kv.statemachine import encode_member
from trio_raft_kv.stores import open_kv_store, store_upkeep
from trio_raft_kv.validation import split_address

log = logging.getLogger("kvnode")

#: Seconds between two attempts to record membership that could not be made or failed.
ANNOUNCE_RETRY = 1.0


def data_dir_is_empty(path: str) -> bool:
    return not os.path.isdir(path) or not os.listdir(path)


def server_ssl(tls_dir: str | None) -> ssl.SSLContext | None:
    if not tls_dir:
        return None
    from trio_raft.transport.tls import server_ssl_context

    p = tls_paths(tls_dir)
    try:
        return server_ssl_context(p["node.crt"], p["node.key"], client_ca=p["ca.crt"])
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSFilesError(f"--tls-dir {tls_dir!r}: not a usable CA, certificate and key: "
                            f"{exc}") from None


async def _probe_was_member(args: argparse.Namespace, peers: list[trio_raft.Peer]) -> str | None:
    """The id of a peer that remembers this node as a member, or None."""
    others = [p for p in peers if p.id != args.id]
    if not others:
        return None
    # A peer that is not up refuses at once (the usual first start of a whole cluster); one
    # that is up gets a generous deadline, so a busy peer is not mistaken for a silent one.
    client = KVClient(others[0].address, ssl_context=client_ssl(args.tls_dir), timeout=5.0)
    try:
        async def ask(p: trio_raft.Peer) -> str | None:
            try:
                r = await client.was_member(p.address, args.id)
            except KVError:
                return None
            return p.id if r.was_member else None

        found = await asyncio.gather(*(ask(p) for p in others))
    finally:
        client.close()
    return next((f for f in found if f), None)


def bootstrap_guard(args: argparse.Namespace, peers: list[trio_raft.Peer]) -> None:
    if not (args.bootstrap and data_dir_is_empty(args.data_dir)):
        return
    witness = asyncio.run(_probe_was_member(args, peers))
    if witness is not None:
        raise StartRefusedError(
            f"the data dir {args.data_dir!r} is empty, but peer {witness} remembers node "
            f"{args.id} as a member: its data was wiped. Remove it (`kvnode remove "
            f"{args.id}`), then start it with --join-as-learner and add it back "
            f"(`add-learner`, `promote`).")


async def _ask_members(args: argparse.Namespace, others: list[trio_raft.Peer]
                       ) -> tuple[str, list[trio_raft.Peer]] | None:
    """(who answered, the members it knows) from the first listed peer (in ``--peers``
    order) that answers; all are asked at once, so peers that are down cost one timeout."""
    client = KVClient(others[0].address, ssl_context=client_ssl(args.tls_dir), timeout=5.0)
    try:
        async def ask(p: trio_raft.Peer) -> list[trio_raft.Peer] | None:
            try:
                r = await client.members(p.address)
            except KVError as exc:
                log.info("join discovery: %s (%s) did not answer: %s", p.id, p.address, exc)
                return None
            return [trio_raft.Peer(m.id, m.address) for m in r.members if m.address]

        answers = await asyncio.gather(*(ask(p) for p in others))
    finally:
        client.close()
    return next(((p.id, a) for p, a in zip(others, answers) if a is not None), None)


def join_discovery(args: argparse.Namespace, peers: list[trio_raft.Peer]
                   ) -> list[trio_raft.Peer]:
    """``peers`` with the members a listed peer knows of added (see the module docstring)."""
    others = [p for p in peers if p.id != args.id]
    if not (args.join_as_learner and others and data_dir_is_empty(args.data_dir)):
        return peers
    found = asyncio.run(_ask_members(args, others))
    if found is None:
        log.warning("join discovery: no listed peer answered; this node knows only its "
                    "--peers until a snapshot names every member")
        return peers
    witness, members = found
    known = {p.id for p in peers}
    added = [m for m in members if m.id not in known and m.id != args.id]
    if added:
        log.info("join discovery: %s named %s", witness,
                 ", ".join(f"{m.id}={m.address}" for m in added))
    return [*peers, *added]


class PinnedTransport(GRPCTransport):
    """A GRPCTransport where this node's ``--peers`` entries win over learned addresses.

    ``--peers`` says how *this* node reaches each member (NAT, proxies). A membership change
    carries one address for the member it adds, the same for every node; a node that has its
    own way to reach that member (an entry in its ``--peers``) keeps using it.
    """

    def __init__(self, *args: Any, pinned: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pinned = pinned

    def upsert_peer(self, peer: Any) -> None:
        address = self._pinned.get(peer.id)
        if address and address != peer.address:
            peer = type(peer)(peer.node_id, peer.id, address)
        super().upsert_peer(peer)


def persist_delay_reader(path: str | None) -> Callable[[], float] | None:
    """Tests only: ``test_persist_delay`` reading seconds from ``path`` (missing/bad: 0)."""
    if not path:
        return None

    def delay() -> float:
        try:
            with open(path) as f:
                return max(0.0, float(f.read().strip() or 0))
        except (OSError, ValueError):
            return 0.0

    return delay


class MembershipAnnouncer:
    """Records (replicated) that this node holds data, once, driven by events.

    The state machine calls :meth:`members_changed` when it applies a member record (in the
    engine's trio thread) or restores a snapshot (in a worker thread); the engine calls
    :meth:`leader_acquired` when this node becomes leader. Either wakes :meth:`run` at once,
    which ends as soon as this node's record is applied. An attempt that cannot be made yet (no
    leader known, nothing applied here) or failed (leaders change, nodes restart) is retried
    after :data:`ANNOUNCE_RETRY` seconds unless an event comes first. Build it inside
    ``trio.run``; :meth:`members_changed` may be called from any thread, the rest run in trio.
    """

    def __init__(self, ctx: ServiceContext, transport: GRPCTransport) -> None:
        self._ctx = ctx
        self._transport = transport
        self._token = trio.lowlevel.current_trio_token()
        self.recorded = trio.Event()
        self._wakeup = trio.Event()
        self._changed()

    def members_changed(self) -> None:
        """Any thread: the state machine's members may have changed."""
        with contextlib.suppress(trio.RunFinishedError):  # the node is gone: no one to tell
            self._token.run_sync_soon(self._changed)

    def _changed(self) -> None:
        if self._ctx.node_id in self._ctx.fsm.members:
            self.recorded.set()
        self._wakeup.set()

    def leader_acquired(self) -> None:
        self._wakeup.set()

    async def run(self, engine: trio_raft.Engine) -> None:
        deregister = engine.register_leader_acquired_callback(self.leader_acquired)
        try:
            while not self.recorded.is_set():
                self._wakeup = trio.Event()
                try:
                    await self._attempt(engine)
                except Exception as exc:  # retried: leaders change, nodes restart
                    log.debug("announce failed: %r", exc)
                if self.recorded.is_set():
                    break
                with trio.move_on_after(ANNOUNCE_RETRY):
                    await self._wakeup.wait()
        finally:
            deregister()

    async def _attempt(self, engine: trio_raft.Engine) -> None:
        node_id = self._ctx.node_id
        if engine.state() is trio_raft.State.LEADER:
            await engine.propose(encode_member(node_id))
            return
        leader = engine.leader()
        bridge = self._transport.bridge
        if leader.address and engine.applied_index() > 0 and bridge is not None:
            await bridge.run(_announce_rpc, leader.address, node_id, self._transport)
            # Committed at the leader: applied here shortly, which sets ``recorded``.
            with trio.move_on_after(ANNOUNCE_RETRY):
                await self.recorded.wait()


async def _announce_rpc(address: str, node_id: str, transport: GRPCTransport) -> None:
    client = KVClient(address, ssl_context=transport._client_config.ssl_context, timeout=3)
    try:
        await client.announce(node_id)
    finally:
        client.close()


async def _stop_on_signal(cancel_scope: trio.CancelScope,
                          signals: Any, stopped_by: list[str]) -> None:
    async for signum in signals:
        stopped_by.append(signal.Signals(signum).name)
        cancel_scope.cancel()
        return


async def run_node(args: argparse.Namespace, peers: list[trio_raft.Peer],
                   cipher: Cipher | None = None, pinned: dict[str, str] | None = None) -> int:
    """Serve until stopped. ``pinned``: the addresses this node was told (``--peers``);
    by default every peer's."""
    local = next((p for p in peers if p.id == args.id), None)
    local_address = local.address if local is not None else args.listen
    host, port = split_address(args.listen, "--listen", any_port=True)
    fsm = open_kv_store(getattr(args, "store", "memory"), args.data_dir, cipher)
    metrics = Metrics(args.id)
    ctx = ServiceContext(args.id, fsm, metrics)
    ctx.scratch_dir = args.data_dir
    remove_stale_backups(args.data_dir)
    transport = PinnedTransport(local_address=local_address,
                                server_ssl=server_ssl(args.tls_dir),
                                client_ssl=client_ssl(args.tls_dir),
                                pinned=pinned if pinned is not None else
                                {p.id: p.address for p in peers if p.id != args.id},
                                limits=server_limits(args),
                                native_lanes=not getattr(args, "no_native_lanes", False))
    announcer = MembershipAnnouncer(ctx, transport)
    fsm.on_members_changed = announcer.members_changed
    handlers = [KVService(ctx), AdminService(ctx)]
    stopped_by: list[str] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(transport.serve, host, port, handlers=handlers))
            ctx.portal = transport.portal
            metrics_port = None
            if args.metrics_listen:
                mhost, mport = split_address(args.metrics_listen, "--metrics-listen",
                                             any_port=True)
                metrics_port = metrics.start_server(mhost, mport)
            cfg = trio_raft.OpenConfig(
                local_id=args.id, local_address=local_address, data_dir=args.data_dir,
                peers=peers, bootstrap=args.bootstrap, state_machine=fsm, transport=transport,
                snapshot_every=args.snapshot_every, join_as_learner=args.join_as_learner,
                tick_interval=args.tick_interval, heartbeat_tick=args.heartbeat_tick,
                election_tick=args.election_tick,
                observer=metrics.engine, raft_cipher=cipher,
                test_persist_delay=persist_delay_reader(
                    getattr(args, "test_fsync_delay_file", None)))
            try:
                async with trio_raft.open_engine(cfg) as engine:
                    ctx.engine = engine
                    metrics.refresh(engine, fsm)
                    gc_threshold = getattr(args, "gc_threshold", 0)
                    if gc_threshold:  # once started: what it holds now is frozen
                        trio_raft.tune_gc(gc_threshold)
                    print(json.dumps({"event": "ready", "id": args.id, "port": bound,
                                      "metrics_port": metrics_port, "pid": os.getpid(),
                                      "gc_threshold": gc.get_threshold()[0]}),
                          flush=True)
                    async with trio.open_nursery() as tasks:
                        tasks.start_soon(_stop_on_signal, tasks.cancel_scope, signals,
                                         stopped_by)
                        tasks.start_soon(metrics.refresh_forever, engine, fsm)
                        tasks.start_soon(announcer.run, engine)
                        tasks.start_soon(store_upkeep, fsm)
                        await engine.wait_closed()
                        tasks.cancel_scope.cancel()
                    ctx.engine = None
            finally:
                ctx.engine = None
                try:
                    fsm.close()  # after the engine: commits what was applied
                except Exception:  # the store recovers at the next start (docs/api.md)
                    log.exception("closing the kv store failed")
                await transport.aclose()
                metrics.stop_server()
    reason = stopped_by[0] if stopped_by else "removed from the cluster or engine closed"
    print(json.dumps({"event": "stopped", "id": args.id, "reason": reason}), flush=True)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """Run the node; 0 after a clean stop. Refusals and fatal errors are raised."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    peers = trio_raft.parse_peers(args.peers) if args.peers else []
    cipher = open_cipher(args)  # a wrong or exposed KEK stops here: nothing is served
    bootstrap_guard(args, peers)
    pinned = {p.id: p.address for p in peers if p.id != args.id}
    return trio.run(run_node, args, join_discovery(args, peers), cipher, pinned)

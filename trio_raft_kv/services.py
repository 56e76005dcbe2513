"""The KV and Admin gRPC services of a kvnode, served on the raft transport's grpclib server.

grpclib runs the handlers on the transport's asyncio loop. Every request is decoded strictly
and validated whole there (:mod:`trio_raft_kv.replies`, :mod:`trio_raft_kv.validation`) before
anything is proposed. Writes (Put, Delete, CompareAndSwap, and PutStream in
:mod:`trio_raft_kv.putstream`) are encoded on the loop, handed to the trio thread in coalesced
batches (``portal.post``) and submitted with ``Engine.propose_nowait``, whose completion
callback settles the waiting handler's future: no trio task per write. Other calls cross into
trio once (``portal.run``). Either way the outcome becomes the status
:func:`trio_raft_kv.replies.status_for` gives it:

* ``FAILED_PRECONDITION``: the engine's ``NotAppliedError`` family (not the leader, with the
  trailer ``leader-address`` when known; a transfer or cutover in progress; the engine closed;
  a membership change refused): certainly not applied;
* ``INVALID_ARGUMENT``: a malformed request: certainly not applied;
* ``UNAVAILABLE``: the engine's ``OutcomeUnknownError`` family (leadership lost while waiting,
  the engine closing or failing under the request) and anything unexpected: the outcome is
  unknown.

:class:`ServiceContext` is what every handler shares: the engine once it is open, the state
machine, the metrics and the transport's portal into trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio
from grpclib.const import Cardinality, Handler, Status

import trio_raft
from trio_raft import errors
from trio_raft_kv import statemachine as kvsm
from trio_raft_kv import validation as check
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import InvalidFieldError, Reply
from trio_raft_kv.metrics import Metrics
from trio_raft_kv.putstream import serve_put_stream
from trio_raft_kv.replies import (
    StrictRequest,
    receive_request,
    send_reply,
    send_stopping,
    status_for,
)

KV_PATH = "/trio_raft.kv.v1.KV/"
ADMIN_PATH = "/trio_raft.kv.v1.Admin/"


class ServiceContext:
    """What the handlers share: the engine (set once open), the state machine, the metrics,
    and the transport's portal into the trio thread (set once the server runs)."""

    def __init__(self, node_id: str, fsm: kvsm.KVStore, metrics: Metrics) -> None:
        self.node_id = node_id
        self.fsm = fsm
        self.metrics = metrics
        self.engine: trio_raft.Engine | None = None
        self.portal: Any = None
        #: Where a backup is written before it is streamed (the data dir; None: system temp).
        self.scratch_dir: str | None = None
        #: Run (in trio) after a Compact call compacted the log: the store's own upkeep.
        self.after_compact: Callable[[], Awaitable[None]] | None = None

    def require_engine(self) -> trio_raft.Engine:
        if self.engine is None:
            raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
        return self.engine

    def leader_address(self) -> str:
        return self.engine.leader().address if self.engine is not None else ""

    def translate(self, exc: BaseException) -> Reply:
        """Map an exception to the status a client can rely on."""
        return status_for(exc, self.leader_address)

    def submit(self, data: bytes, fut: asyncio.Future[Any],
               loop: asyncio.AbstractEventLoop) -> None:
        """Trio thread: propose ``data``; settle ``fut`` (on ``loop``) with the
        :class:`trio_raft.ProposalResult` or with the :class:`Reply` its failure maps to."""
        t0 = time.perf_counter()
        portal = self.portal

        def done(res: outcome.Outcome[Any]) -> None:
            if isinstance(res, outcome.Error):
                if not isinstance(res.error, Reply):
                    self.metrics.proposal_failed(type(res.error).__name__)
                res = outcome.Error(self.translate(res.error))
            else:
                self.metrics.proposal_done(time.perf_counter() - t0)
            portal.post_to_loop(loop, _settle, fut, res)

        try:
            self.require_engine().propose_nowait(data, done)
        except Exception as exc:
            done(outcome.Error(exc))


def remove_stale_backups(data_dir: str) -> None:
    """Delete temporary backup files a node that died while streaming one left behind."""
    if os.path.isdir(data_dir):
        for name in os.listdir(data_dir):
            if name.startswith(BACKUP_PREFIX):
                _unlink_quietly(os.path.join(data_dir, name))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _settle(fut: asyncio.Future[Any], res: outcome.Outcome[Any]) -> None:  # asyncio thread
    if fut.done():  # the caller went away
        return
    if isinstance(res, outcome.Error):
        fut.set_exception(res.error)
    elif isinstance(res, outcome.Value):
        fut.set_result(res.value)


_Handle = Callable[[Any], Awaitable[None]]


class _ServiceBase:
    """Unary handlers over raw grpclib streams (so errors can carry trailing metadata)."""

    path = ""
    #: Reads and admin calls: rpc -> (method, request type, response type); the method runs
    #: in trio.
    methods: dict[str, tuple[str, type, type]] = {}
    #: Writes: rpc -> (build, respond, request type, response type). ``build(request)`` runs on
    #: the loop (validation and encoding only) and returns the command to propose;
    #: ``respond(request, result)`` turns the ProposalResult into the response message.
    proposals: dict[str, tuple[str, str, type, type]] = {}

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def __mapping__(self) -> dict[str, Handler]:
        out = {}
        for rpc, (attr, req_t, resp_t) in self.methods.items():
            out[self.path + rpc] = Handler(self._in_trio(getattr(self, attr)),
                                           Cardinality.UNARY_UNARY, StrictRequest(req_t), resp_t)
        for rpc, (build, respond, req_t, resp_t) in self.proposals.items():
            out[self.path + rpc] = Handler(
                self._proposal(getattr(self, build), getattr(self, respond)),
                Cardinality.UNARY_UNARY, StrictRequest(req_t), resp_t)
        return out

    def _unary(self, call: Callable[[Any, Any], Awaitable[Any]]) -> _Handle:
        """A grpclib handler around ``call(portal, request) -> response``: a :class:`Reply`
        becomes its status (with ``leader-address`` when known), a bridge failure UNAVAILABLE."""
        ctx = self.ctx

        async def handle(stream: Any) -> None:
            try:
                request = await receive_request(stream)
                portal = ctx.portal
                if portal is None or request is None:
                    raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
                response = await call(portal, request)
            except Reply as r:
                await send_reply(stream, r)
                return
            except Exception as exc:  # the bridge itself failed (e.g. shutting down)
                await send_stopping(stream, exc)
                return
            await stream.send_message(response)

        return handle

    def _proposal(self, build: Callable[[Any], bytes],
                  respond: Callable[[Any, Any], Any]) -> _Handle:
        ctx = self.ctx

        async def call(portal: Any, request: Any) -> Any:
            try:
                data = build(request)  # validation and encoding, here on the loop
            except InvalidFieldError as exc:
                raise Reply(Status.INVALID_ARGUMENT, str(exc)) from None
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()
            portal.post(ctx.submit, data, fut, loop)
            return respond(request, await fut)

        return self._unary(call)

    def _in_trio(self, fn: Callable[[Any], Awaitable[Any]]) -> _Handle:
        ctx = self.ctx

        async def call(portal: Any, request: Any) -> Any:
            return await portal.run(_guarded, ctx, fn, request)

        return self._unary(call)


async def _guarded(ctx: ServiceContext, fn: Callable[[Any], Awaitable[Any]],
                   request: Any) -> Any:
    """Runs in trio: call ``fn`` and turn every failure into a :class:`Reply`."""
    try:
        return await fn(request)
    except trio.Cancelled:
        raise
    except Exception as exc:
        raise ctx.translate(exc) from None


class KVService(_ServiceBase):
    path = KV_PATH
    methods = {
        "Get": ("get", pb.GetRequest, pb.GetResponse),
        "Status": ("status", pb.StatusRequest, pb.StatusResponse),
    }
    proposals = {
        "Put": ("build_put", "respond_put", pb.PutRequest, pb.PutResponse),
        "Delete": ("build_delete", "respond_delete", pb.DeleteRequest, pb.DeleteResponse),
        "CompareAndSwap": ("build_cas", "respond_cas", pb.CasRequest, pb.CasResponse),
    }

    def __mapping__(self) -> dict[str, Handler]:
        out = super().__mapping__()
        out[self.path + "PutStream"] = Handler(self.put_stream, Cardinality.STREAM_STREAM,
                                               StrictRequest(pb.PutRequest), pb.PutResponse)
        return out

    async def put_stream(self, stream: Any) -> None:
        await serve_put_stream(self, stream)

    def build_put(self, req: pb.PutRequest) -> bytes:
        check.check_key(req.key)
        check.check_value(req.value)
        return kvsm.encode_put(req.key, req.value)

    def respond_put(self, req: pb.PutRequest, result: trio_raft.ProposalResult) -> pb.PutResponse:
        return pb.PutResponse(index=result.commit_index)

    def build_delete(self, req: pb.DeleteRequest) -> bytes:
        check.check_key(req.key)
        return kvsm.encode_delete(req.key)

    def respond_delete(self, req: pb.DeleteRequest,
                       result: trio_raft.ProposalResult) -> pb.DeleteResponse:
        return pb.DeleteResponse(deleted=bool(result.response), index=result.commit_index)

    def build_cas(self, req: pb.CasRequest) -> bytes:
        check.check_cas(req.key, req.value, req.expected, req.expect_absent)
        return kvsm.encode_cas(req.key, req.expected, req.expect_absent, req.value)

    def respond_cas(self, req: pb.CasRequest, result: trio_raft.ProposalResult) -> pb.CasResponse:
        r: kvsm.CasResult = result.response
        return pb.CasResponse(swapped=r.swapped, found=r.found, current=r.current,
                              index=result.commit_index)

    async def get(self, req: pb.GetRequest) -> pb.GetResponse:
        check.check_key(req.key)
        mode = check.check_read_mode(req.mode)
        engine = self.ctx.require_engine()
        self.ctx.metrics.read(mode.name.lower())
        if mode is pb.ReadMode.LEASE:
            await engine.lease_read()
        elif mode is not pb.ReadMode.LOCAL:
            await engine.linearizable_read()
        value = self.ctx.fsm.get(req.key)
        return pb.GetResponse(found=value is not None, value=value or b"",
                              index=engine.applied_index())

    async def status(self, req: pb.StatusRequest) -> pb.StatusResponse:
        engine = self.ctx.require_engine()
        st = engine.status()
        env = engine.envelope_status()
        return pb.StatusResponse(id=self.ctx.node_id, state=str(st.state.value),
                                 leader_id=st.leader.id, leader_address=st.leader.address,
                                 term=st.term, commit_index=st.commit_index,
                                 applied_index=engine.applied_index(),
                                 envelope_on=env.on, active_key_id=env.active_key_id,
                                 cutover_index=env.cutover_index or 0,
                                 kek_fingerprint=env.kek_fingerprint)


#: Bytes per BackupChunk message.
BACKUP_CHUNK = 256 << 10
#: Name prefix of the temporary backup files a node writes into its data dir.
BACKUP_PREFIX = "kvnode-backup-"


class AdminService(_ServiceBase):
    path = ADMIN_PATH
    methods = {
        "AddLearner": ("add_learner", pb.AddLearnerRequest, pb.AdminResponse),
        "Promote": ("promote", pb.PromoteRequest, pb.AdminResponse),
        "Remove": ("remove", pb.RemoveRequest, pb.AdminResponse),
        "Transfer": ("transfer", pb.TransferRequest, pb.AdminResponse),
        "Members": ("members", pb.MembersRequest, pb.MembersResponse),
        "Announce": ("announce", pb.AnnounceRequest, pb.AdminResponse),
        "WasMember": ("was_member", pb.WasMemberRequest, pb.WasMemberResponse),
        "EncryptionEnable": ("encryption_enable", pb.EncryptionRequest, pb.EncryptionResponse),
        "EncryptionRotate": ("encryption_rotate", pb.EncryptionRequest, pb.EncryptionResponse),
        "Compact": ("compact", pb.CompactRequest, pb.AdminResponse),
    }

    def __mapping__(self) -> dict[str, Handler]:
        out = super().__mapping__()
        out[self.path + "Backup"] = Handler(self.backup, Cardinality.UNARY_STREAM,
                                            StrictRequest(pb.BackupRequest), pb.BackupChunk)
        return out

    async def backup(self, stream: Any) -> None:
        """Export a backup on the leader (trio), then stream the file (this loop; reads in a
        thread) and delete it."""
        ctx = self.ctx
        try:
            request = await receive_request(stream)
            portal = ctx.portal
            if portal is None or request is None:
                raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
            path, info = await portal.run(_guarded, ctx, self._export, request)
        except Reply as r:
            await send_reply(stream, r)
            return
        except Exception as exc:
            await send_stopping(stream, exc)
            return
        try:
            await stream.send_message(pb.BackupChunk(index=info.index, term=info.term,
                                                     size=info.file_bytes))
            with open(path, "rb") as f:  # each read runs in a thread
                while chunk := await asyncio.to_thread(f.read, BACKUP_CHUNK):
                    await stream.send_message(pb.BackupChunk(data=chunk))
        finally:
            await asyncio.to_thread(_unlink_quietly, path)

    async def _export(self, req: pb.BackupRequest) -> tuple[str, Any]:
        engine = self._leader_engine()
        await engine.linearizable_read()  # every write acknowledged before this is applied
        fd, path = tempfile.mkstemp(prefix=BACKUP_PREFIX, suffix=".tmp",
                                    dir=self.ctx.scratch_dir or None)
        os.close(fd)
        try:
            info = await engine.export_snapshot(path)
        except BaseException:
            _unlink_quietly(path)
            raise
        return path, info

    def _leader_engine(self) -> trio_raft.Engine:
        engine = self.ctx.require_engine()
        if engine.state() is not trio_raft.State.LEADER:
            raise errors.NotLeaderError()
        return engine

    def _prev(self, engine: trio_raft.Engine, prev_index: int) -> int:
        return prev_index or engine.status().configuration_index

    def _reply(self, engine: trio_raft.Engine, index: int) -> pb.AdminResponse:
        return pb.AdminResponse(index=index, leader_id=engine.leader().id)

    async def add_learner(self, req: pb.AddLearnerRequest) -> pb.AdminResponse:
        check.check_member_id(req.id)
        check.check_address(req.address)
        engine = self._leader_engine()
        index = await engine.add_learner(req.id, req.address, self._prev(engine, req.prev_index))
        return self._reply(engine, index)

    async def promote(self, req: pb.PromoteRequest) -> pb.AdminResponse:
        check.check_member_id(req.id)
        engine = self._leader_engine()
        min_applied = req.min_applied_index or engine.status().commit_index
        index = await engine.promote_learner(req.id, self._prev(engine, req.prev_index),
                                             min_applied)
        return self._reply(engine, index)

    async def remove(self, req: pb.RemoveRequest) -> pb.AdminResponse:
        check.check_member_id(req.id)
        engine = self._leader_engine()
        index = await engine.remove_server(req.id, self._prev(engine, req.prev_index))
        return self._reply(engine, index)

    async def transfer(self, req: pb.TransferRequest) -> pb.AdminResponse:
        if req.id:
            check.check_member_id(req.id)
        engine = self._leader_engine()
        if req.id:
            conf = await engine.configuration()
            target = next((s for s in conf.servers if s.id == req.id), None)
            if target is None:
                raise Reply(Status.INVALID_ARGUMENT, f"{req.id!r} is not a member")
            await engine.transfer_leadership_to_server(target.id, target.address)
        else:
            await engine.transfer_leadership()
        return self._reply(engine, 0)

    async def members(self, req: pb.MembersRequest) -> pb.MembersResponse:
        engine = self.ctx.require_engine()
        conf = await engine.configuration()
        return pb.MembersResponse(
            members=[pb.Member(id=s.id, address=s.address, suffrage=s.suffrage)
                     for s in conf.servers],
            configuration_index=engine.status().configuration_index)

    async def announce(self, req: pb.AnnounceRequest) -> pb.AdminResponse:
        check.check_member_id(req.id)
        engine = self._leader_engine()
        if req.id in self.ctx.fsm.members:
            return self._reply(engine, engine.applied_index())
        result = await engine.propose(kvsm.encode_member(req.id))
        return self._reply(engine, result.commit_index)

    async def was_member(self, req: pb.WasMemberRequest) -> pb.WasMemberResponse:
        check.check_member_id(req.id)
        engine = self.ctx.require_engine()
        return pb.WasMemberResponse(was_member=req.id in self.ctx.fsm.members,
                                    applied_index=engine.applied_index())

    # -- the raft envelope (docs/envelope.md) ---------------------------------------------
    def _cipher_engine(self) -> trio_raft.Engine:
        engine = self._leader_engine()
        if engine.raft_cipher() is None:
            raise Reply(Status.FAILED_PRECONDITION,
                        "not applied: this node serves without a key store (--key-dir)")
        return engine

    def _encryption_reply(self, engine: trio_raft.Engine) -> pb.EncryptionResponse:
        env = engine.envelope_status()
        return pb.EncryptionResponse(cutover_index=env.cutover_index or 0,
                                     active_key_id=env.active_key_id,
                                     leader_id=engine.leader().id)

    async def encryption_enable(self, req: pb.EncryptionRequest) -> pb.EncryptionResponse:
        engine = self._cipher_engine()
        await engine.enable_raft_envelope(engine.raft_cipher())
        return self._encryption_reply(engine)

    async def encryption_rotate(self, req: pb.EncryptionRequest) -> pb.EncryptionResponse:
        engine = self._cipher_engine()
        if engine.raft_cutover_index() is None:
            raise Reply(Status.FAILED_PRECONDITION,
                        "not applied: the envelope is off (run `encryption enable` first)")
        await engine.rotate_raft_key()
        return self._encryption_reply(engine)

    async def compact(self, req: pb.CompactRequest) -> pb.AdminResponse:
        """This node (leader or not): once ``min_index`` is applied here, a snapshot at the
        applied index that becomes where the data dir begins (``Engine.compact_now``)."""
        engine = self.ctx.require_engine()
        if engine.applied_index() < req.min_index:
            await engine.linearizable_read()  # waits until the commit index is applied here
        if engine.applied_index() < req.min_index:
            raise Reply(Status.FAILED_PRECONDITION,
                        f"not applied: index {req.min_index} is not applied here yet")
        self.ctx.fsm.flush()  # a store that keeps its own files commits what it applied
        index = await engine.compact_now()
        if self.ctx.after_compact is not None:
            await self.ctx.after_compact()
        return self._reply(engine, index)

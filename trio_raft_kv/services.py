"""The KV and Admin gRPC services of a kvnode, served on the raft transport's grpclib server.

grpclib runs the handlers on the transport's asyncio loop. Writes (Put, Delete, CompareAndSwap)
are validated and encoded there, then handed to the trio thread in coalesced batches
(``portal.post``) and submitted with ``Engine.propose_nowait``, whose completion callback settles
the waiting handler's future: no trio task per write. Other calls cross into trio once
(``portal.run``). Either way the outcome is mapped to a status code:

* ``NotLeaderError``, ``LeadershipTransferInProgressError``, ``EnvelopeCutoverInProgressError``:
  rejected before reaching raft, certainly not applied -> ``FAILED_PRECONDITION`` with trailing
  metadata ``leader-address`` (absent when the leader is unknown).
* ``LeadershipLostError`` (a ``NotLeaderError``, so it is checked first), ``EngineClosedError``
  and anything else unexpected: the outcome is unknown -> ``UNAVAILABLE``.
* malformed requests -> ``INVALID_ARGUMENT``.

A client never sees a stack trace: unexpected exceptions are logged here and answered with a
short message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio
from grpclib.const import Cardinality, Handler, Status
from grpclib.metadata import encode_grpc_message

import trio_raft
from trio_raft import errors
from trio_raft_kv import statemachine as kvfsm
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.metrics import Metrics

log = logging.getLogger("kvnode.service")

LEADER_ADDRESS_KEY = "leader-address"
KV_PATH = "/trio_raft.kv.v1.KV/"
ADMIN_PATH = "/trio_raft.kv.v1.Admin/"


class Reply(Exception):
    """A non-OK gRPC status to send back, raised on the trio side."""

    def __init__(self, status: Status, message: str, leader_address: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.leader_address = leader_address


class Node:
    """What the handlers need: the engine (set once open), the state machine, the metrics."""

    def __init__(self, node_id: str, fsm: kvfsm.KVStateMachine, metrics: Metrics) -> None:
        self.node_id = node_id
        self.fsm = fsm
        self.metrics = metrics
        self.engine: trio_raft.Engine | None = None
        self.portal: Any = None

    def require_engine(self) -> trio_raft.Engine:
        if self.engine is None:
            raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
        return self.engine

    def leader_address(self) -> str:
        return self.engine.leader().address if self.engine is not None else ""

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

    def translate(self, exc: BaseException) -> Reply:
        """Map an engine exception to the status a client can rely on."""
        if isinstance(exc, Reply):
            return exc
        if isinstance(exc, errors.LeadershipLostError | errors.EngineClosedError):
            return Reply(Status.UNAVAILABLE, f"outcome unknown: {type(exc).__name__}")
        if isinstance(exc, errors.NotLeaderError | errors.LeadershipTransferInProgressError
                      | errors.EnvelopeCutoverInProgressError):
            return Reply(Status.FAILED_PRECONDITION, f"not the leader: {type(exc).__name__}",
                         self.leader_address())
        if isinstance(exc, errors.ConfigError):
            return Reply(Status.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, errors.FailedPreconditionError | errors.ConfigIndexMismatchError
                      | errors.MembershipChangePendingError
                      | errors.TooManyPendingConfigsError
                      | errors.TransportPeerUnknownError):
            return Reply(Status.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
        if type(exc).__name__.startswith("LeadershipTransfer"):
            return Reply(Status.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, errors.TransportClosedError):
            return Reply(Status.UNAVAILABLE, "node is stopping")
        log.error("unexpected error while serving a request", exc_info=exc)
        return Reply(Status.UNAVAILABLE, f"outcome unknown: internal error ({type(exc).__name__})")


def check_key(key: str) -> None:
    if not key:
        raise Reply(Status.INVALID_ARGUMENT, "key must not be empty")
    if len(key.encode("utf-8")) > kvfsm.MAX_KEY_BYTES:
        raise Reply(Status.INVALID_ARGUMENT, f"key longer than {kvfsm.MAX_KEY_BYTES} bytes")


def check_value(value: bytes, what: str = "value") -> None:
    if len(value) > kvfsm.MAX_VALUE_BYTES:
        raise Reply(Status.INVALID_ARGUMENT, f"{what} larger than {kvfsm.MAX_VALUE_BYTES} bytes")


def _settle(fut: asyncio.Future[Any], res: outcome.Outcome[Any]) -> None:  # asyncio thread
    if fut.done():  # the caller went away
        return
    if isinstance(res, outcome.Error):
        fut.set_exception(res.error)
    else:
        fut.set_result(res.value)


async def _send_reply(stream: Any, r: Reply) -> None:
    # grpclib refuses empty metadata values: an unknown leader is no trailer.
    metadata = {LEADER_ADDRESS_KEY: r.leader_address} if r.leader_address else None
    await stream.send_trailing_metadata(status=r.status, status_message=r.message,
                                        metadata=metadata)


async def _send_stopping(stream: Any, exc: BaseException) -> None:
    log.debug("request failed outside the engine: %r", exc)
    await stream.send_trailing_metadata(status=Status.UNAVAILABLE,
                                        status_message="node is stopping")


#: Unanswered requests one PutStream call may have proposed at a time.
STREAM_WINDOW = 1024
#: Seconds a failed PutStream call waits for the client to end its side after the status.
STREAM_LINGER = 10.0
_StreamItem = tuple[pb.PutRequest, "asyncio.Future[Any]"] | Reply | None
#: Statuses that guarantee the request was not applied.
_NOT_APPLIED = (Status.FAILED_PRECONDITION, Status.INVALID_ARGUMENT)


_NOTHING: Any = object()
_MESSAGE_PREFIX = struct.Struct(">?I")  # gRPC framing: compressed flag, length


async def _send_messages(stream: Any, messages: list[Any]) -> None:
    """Send ``messages`` on a server stream in one DATA write (a gRPC DATA frame may carry
    several length-prefixed messages), instead of a write per message."""
    inner, codec = getattr(stream, "_stream", None), getattr(stream, "_codec", None)
    if inner is None or codec is None or len(messages) == 1:
        for m in messages:
            await stream.send_message(m)
        return
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    parts = []
    for m in messages:
        body = codec.encode(m, type(m))
        parts += (_MESSAGE_PREFIX.pack(False, len(body)), body)
    await inner.send_data(b"".join(parts))


async def _settle_after_failure(queue: asyncio.Queue[_StreamItem], first: Reply) -> Reply:
    """The status ending a PutStream whose request ``first`` failed: wait for the requests
    proposed after it; their outcome is only "not applied" if all of theirs is."""
    certain = first.status in _NOT_APPLIED
    while not queue.empty():
        item = queue.get_nowait()
        if not isinstance(item, tuple):
            continue
        try:
            await item[1]
        except Reply as r:
            certain = certain and r.status in _NOT_APPLIED
        else:
            certain = False
    if certain:
        return first
    return Reply(Status.UNAVAILABLE, f"outcome unknown after: {first.message}")


async def _end_stream_call(stream: Any, r: Reply) -> None:
    """End a call whose client may still be sending with ``r``'s status, so that the client
    reads every answer and the status.

    grpclib's ``send_trailing_metadata`` resets such a stream right after a non-OK status, and
    its client, seeing the reset, drops what it had not read yet, status included. So the
    trailers are sent here without the reset, and the client is given ``STREAM_LINGER``
    seconds to end its side (kvnode's client does so on reading the status) before the reset.
    """
    inner = getattr(stream, "_stream", None)
    if inner is None:  # not the grpclib this was written against: the plain way
        await _send_reply(stream, r)
        return
    if not getattr(stream, "_send_initial_metadata_done", False):
        await stream.send_initial_metadata()
    headers = [("grpc-status", str(r.status.value)),
               ("grpc-message", encode_grpc_message(r.message))]
    if r.leader_address:
        headers.append((LEADER_ADDRESS_KEY, r.leader_address))
    await inner.send_headers(headers, end_stream=True)
    stream._send_trailing_metadata_done = True
    with contextlib.suppress(Exception):
        async with asyncio.timeout(STREAM_LINGER):
            async for _ in stream:  # whatever the client still sends: never proposed
                pass
            return
    with contextlib.suppress(Exception):
        await stream.cancel()


class _Base:
    """Unary handlers over raw grpclib streams (so errors can carry trailing metadata)."""

    path = ""
    methods: dict[str, tuple[str, type, type]] = {}
    #: Writes: rpc -> (build, respond, request type, response type). ``build(request)`` runs on
    #: the loop (validation and encoding only) and returns the command to propose;
    #: ``respond(request, result)`` turns the ProposalResult into the response message.
    proposals: dict[str, tuple[str, str, type, type]] = {}

    def __init__(self, node: Node) -> None:
        self.node = node

    def __mapping__(self) -> dict[str, Handler]:
        out = {}
        for rpc, (attr, req_t, resp_t) in self.methods.items():
            out[self.path + rpc] = Handler(self._wrap(getattr(self, attr)),
                                           Cardinality.UNARY_UNARY, req_t, resp_t)
        for rpc, (build, respond, req_t, resp_t) in self.proposals.items():
            out[self.path + rpc] = Handler(
                self._proposal_handler(getattr(self, build), getattr(self, respond)),
                Cardinality.UNARY_UNARY, req_t, resp_t)
        return out

    def _unary(self, call: Callable[[Any, Any], Awaitable[Any]]
               ) -> Callable[[Any], Awaitable[None]]:
        """A grpclib handler around ``call(portal, request) -> response``: a :class:`Reply`
        becomes its status (with ``leader-address`` when known), a bridge failure UNAVAILABLE."""
        node = self.node

        async def handle(stream: Any) -> None:
            request = await stream.recv_message()
            portal = node.portal
            try:
                if portal is None or request is None:
                    raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
                response = await call(portal, request)
            except Reply as r:
                await _send_reply(stream, r)
                return
            except Exception as exc:  # the bridge itself failed (e.g. shutting down)
                await _send_stopping(stream, exc)
                return
            await stream.send_message(response)

        return handle

    def _proposal_handler(self, build: Callable[[Any], bytes],
                          respond: Callable[[Any, Any], Any]) -> Callable[[Any], Awaitable[None]]:
        node = self.node

        async def call(portal: Any, request: Any) -> Any:
            data = build(request)  # validation and encoding, here on the loop
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()
            portal.post(node.submit, data, fut, loop)
            return respond(request, await fut)

        return self._unary(call)

    def _wrap(self, fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[None]]:
        node = self.node

        async def call(portal: Any, request: Any) -> Any:
            return await portal.run(_guarded, node, fn, request)

        return self._unary(call)


async def _guarded(node: Node, fn: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    """Runs in trio: call ``fn`` and turn every failure into a :class:`Reply`."""
    try:
        return await fn(request)
    except trio.Cancelled:
        raise
    except Exception as exc:
        raise node.translate(exc) from None


class KVService(_Base):
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
                                               pb.PutRequest, pb.PutResponse)
        return out

    async def put_stream(self, stream: Any) -> None:
        """PutStream: each request is proposed as it arrives (at most ``STREAM_WINDOW`` of them
        unanswered) and answered in order; the first failure ends the call (see kv.proto)."""
        node = self.node
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(STREAM_WINDOW)
        queue: asyncio.Queue[_StreamItem] = asyncio.Queue()
        stopped = False

        async def read() -> None:
            async for request in stream:
                await window.acquire()
                if stopped:
                    return
                try:
                    if node.portal is None:
                        raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
                    data = self.build_put(request)  # validation and encoding, here on the loop
                except Reply as r:
                    queue.put_nowait(r)
                    return
                fut: asyncio.Future[Any] = loop.create_future()
                node.portal.post(node.submit, data, fut, loop)
                queue.put_nowait((request, fut))
            queue.put_nowait(None)

        held: list[_StreamItem] = []  # taken from the queue, not answered yet

        async def answer() -> Reply | None:
            nonlocal stopped
            item = await queue.get()
            while True:
                held[:] = [item]
                if not isinstance(item, tuple):
                    return item  # the client's end (None) or a malformed request
                # Answer it and every later one already settled, in one write.
                replies: list[pb.PutResponse] = []
                failure: Reply | None = None
                while True:
                    request, fut = item
                    try:
                        result = await fut
                    except Reply as r:
                        failure = r
                        break
                    replies.append(self.respond_put(request, result))
                    if queue.empty():
                        item = _NOTHING
                        break
                    item = queue.get_nowait()
                    if not isinstance(item, tuple) or not item[1].done():
                        break  # answered on the next round
                held[:] = [item]
                if replies:
                    await _send_messages(stream, replies)
                    for _ in replies:
                        window.release()
                if failure is not None:
                    stopped = True  # nothing more is proposed once the reader sees this
                    return await _settle_after_failure(queue, failure)
                if item is _NOTHING:
                    item = await queue.get()

        reader = asyncio.ensure_future(read())
        try:
            reply = await answer()
        except Exception as exc:  # the bridge or the stream failed (e.g. shutting down)
            log.debug("put stream ended outside the engine: %r", exc)
            reply = Reply(Status.UNAVAILABLE, "outcome unknown: node is stopping")
        finally:
            stopped = True
            reader.cancel()
            await asyncio.wait([reader])
            while not queue.empty():  # a client that went away: forget what it waited for
                held.append(queue.get_nowait())
            for item in held:
                if isinstance(item, tuple):
                    item[1].cancel()
        if reply is not None:
            try:
                await _end_stream_call(stream, reply)
            except Exception as exc:  # the connection is gone: no one to tell
                log.debug("could not end a put stream: %r", exc)

    def build_put(self, req: pb.PutRequest) -> bytes:
        check_key(req.key)
        check_value(req.value)
        return kvfsm.encode_put(req.key, req.value)

    def respond_put(self, req: pb.PutRequest, result: trio_raft.ProposalResult) -> pb.PutResponse:
        return pb.PutResponse(index=result.commit_index)

    def build_delete(self, req: pb.DeleteRequest) -> bytes:
        check_key(req.key)
        return kvfsm.encode_delete(req.key)

    def respond_delete(self, req: pb.DeleteRequest,
                       result: trio_raft.ProposalResult) -> pb.DeleteResponse:
        return pb.DeleteResponse(deleted=bool(result.response), index=result.commit_index)

    def build_cas(self, req: pb.CasRequest) -> bytes:
        check_key(req.key)
        check_value(req.value)
        check_value(req.expected, "expected")
        if req.expect_absent and req.expected:
            raise Reply(Status.INVALID_ARGUMENT, "expect_absent and expected are exclusive")
        return kvfsm.encode_cas(req.key, req.expected, req.expect_absent, req.value)

    def respond_cas(self, req: pb.CasRequest, result: trio_raft.ProposalResult) -> pb.CasResponse:
        r: kvfsm.CasResult = result.response
        return pb.CasResponse(swapped=r.swapped, found=r.found, current=r.current,
                              index=result.commit_index)

    async def get(self, req: pb.GetRequest) -> pb.GetResponse:
        check_key(req.key)
        engine = self.node.require_engine()
        try:
            mode = pb.ReadMode(req.mode)
        except ValueError:
            raise Reply(Status.INVALID_ARGUMENT, f"unknown read mode {req.mode}") from None
        self.node.metrics.read(mode.name.lower())
        serve_locally = mode is pb.ReadMode.LOCAL or (
            mode is pb.ReadMode.LEASE and engine.lease_valid())
        if not serve_locally:
            await engine.linearizable_read()
        value = self.node.fsm.get(req.key)
        return pb.GetResponse(found=value is not None, value=value or b"",
                              index=engine.applied_index())

    async def status(self, req: pb.StatusRequest) -> pb.StatusResponse:
        engine = self.node.require_engine()
        st = engine.status()
        return pb.StatusResponse(id=self.node.node_id, state=str(st.state.value),
                                 leader_id=st.leader.id, leader_address=st.leader.address,
                                 term=st.term, commit_index=st.commit_index,
                                 applied_index=engine.applied_index())


class AdminService(_Base):
    path = ADMIN_PATH
    methods = {
        "AddLearner": ("add_learner", pb.AddLearnerRequest, pb.AdminResponse),
        "Promote": ("promote", pb.PromoteRequest, pb.AdminResponse),
        "Remove": ("remove", pb.RemoveRequest, pb.AdminResponse),
        "Transfer": ("transfer", pb.TransferRequest, pb.AdminResponse),
        "Members": ("members", pb.MembersRequest, pb.MembersResponse),
        "Announce": ("announce", pb.AnnounceRequest, pb.AdminResponse),
        "WasMember": ("was_member", pb.WasMemberRequest, pb.WasMemberResponse),
    }

    def _leader_engine(self) -> trio_raft.Engine:
        engine = self.node.require_engine()
        if engine.state() is not trio_raft.State.LEADER:
            raise errors.NotLeaderError()
        return engine

    def _prev(self, engine: trio_raft.Engine, prev_index: int) -> int:
        return prev_index or engine.status().configuration_index

    def _reply(self, engine: trio_raft.Engine, index: int) -> pb.AdminResponse:
        return pb.AdminResponse(index=index, leader_id=engine.leader().id)

    async def add_learner(self, req: pb.AddLearnerRequest) -> pb.AdminResponse:
        if not req.id or not req.address:
            raise Reply(Status.INVALID_ARGUMENT, "id and address are required")
        engine = self._leader_engine()
        index = await engine.add_learner(req.id, req.address, self._prev(engine, req.prev_index))
        return self._reply(engine, index)

    async def promote(self, req: pb.PromoteRequest) -> pb.AdminResponse:
        if not req.id:
            raise Reply(Status.INVALID_ARGUMENT, "id is required")
        engine = self._leader_engine()
        min_applied = req.min_applied_index or engine.status().commit_index
        index = await engine.promote_learner(req.id, self._prev(engine, req.prev_index),
                                             min_applied)
        return self._reply(engine, index)

    async def remove(self, req: pb.RemoveRequest) -> pb.AdminResponse:
        if not req.id:
            raise Reply(Status.INVALID_ARGUMENT, "id is required")
        engine = self._leader_engine()
        index = await engine.remove_server(req.id, self._prev(engine, req.prev_index))
        return self._reply(engine, index)

    async def transfer(self, req: pb.TransferRequest) -> pb.AdminResponse:
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
        engine = self.node.require_engine()
        conf = await engine.configuration()
        return pb.MembersResponse(
            members=[pb.Member(id=s.id, address=s.address, suffrage=s.suffrage)
                     for s in conf.servers],
            configuration_index=engine.status().configuration_index)

    async def announce(self, req: pb.AnnounceRequest) -> pb.AdminResponse:
        if not req.id:
            raise Reply(Status.INVALID_ARGUMENT, "id is required")
        engine = self._leader_engine()
        if req.id in self.node.fsm.members:
            return self._reply(engine, engine.applied_index())
        result = await engine.propose(kvfsm.encode_member(req.id))
        return self._reply(engine, result.commit_index)

    async def was_member(self, req: pb.WasMemberRequest) -> pb.WasMemberResponse:
        engine = self.node.require_engine()
        return pb.WasMemberResponse(was_member=req.id in self.node.fsm.members,
                                    applied_index=engine.applied_index())

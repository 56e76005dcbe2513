"""The ``PutStream`` call: many puts in flight over one HTTP/2 stream, answered in order.

Runs on the transport's asyncio loop, like every handler. A reader task takes the requests
that arrived whole together (``ready_requests``: one pass over the buffer instead of two
awaited reads each), validates and encodes each request and hands it to the trio thread
(``ServiceContext.submit``), keeping at most :data:`STREAM_WINDOW` of them unanswered; the
handler answers them in request order, batching the answers already settled into one DATA
write.

The call ends at the first request that cannot be answered with a response (a malformed one,
a refusal, a failure). Its status then speaks for every unanswered request (protos/kv.proto):
it stays the failure's own ``FAILED_PRECONDITION``/``INVALID_ARGUMENT`` only if every request
proposed after it is certainly not applied too; otherwise it becomes ``UNAVAILABLE`` (outcome
unknown). Nothing is proposed once the failure is seen, and a request the client sends after
the status is never proposed. A message the transport refuses on its prefix ends the call with
the transport's status (a compressed one: ``UNIMPLEMENTED``); a read that fails otherwise with
``UNAVAILABLE``. A client that goes away makes the handler forget (cancel) every future it
still holds; the proposals themselves may still commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from trio_raft.transport.grpc_h2server import ready_requests
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import NOT_APPLIED_STATUSES, InvalidFieldError, Reply
from trio_raft_kv.replies import decode_failure, end_stream_call, send_messages

if TYPE_CHECKING:
    from trio_raft_kv.services import KVService

log = logging.getLogger("kvnode.service")

#: Unanswered requests one PutStream call may have proposed at a time.
STREAM_WINDOW = 1024
StreamItem = tuple[pb.PutRequest, "asyncio.Future[Any]"] | Reply | None
_NOTHING: Any = object()


async def settle_after_failure(queue: asyncio.Queue[StreamItem], first: Reply) -> Reply:
    """The status ending a PutStream whose request ``first`` failed: wait for the requests
    proposed after it; their outcome is only "not applied" if all of theirs is."""
    certain = first.status in NOT_APPLIED_STATUSES
    while not queue.empty():
        item = queue.get_nowait()
        if not isinstance(item, tuple):
            continue
        try:
            await item[1]
        except Reply as r:
            certain = certain and r.status in NOT_APPLIED_STATUSES
        else:
            certain = False
    if certain:
        return first
    return Reply(Status.UNAVAILABLE, f"outcome unknown after: {first.message}")


async def serve_put_stream(service: KVService, stream: Any) -> None:
    """Serve one PutStream call on ``stream`` (see the module docstring)."""
    ctx = service.ctx
    loop = asyncio.get_running_loop()
    window = asyncio.Semaphore(STREAM_WINDOW)
    queue: asyncio.Queue[StreamItem] = asyncio.Queue()
    stopped = False

    async def requests() -> AsyncIterator[pb.PutRequest]:
        # Each message as grpclib receives it, then those that arrived whole behind it, taken
        # in one go (trio_raft/transport/grpc_h2server.py, ``ready_requests``).
        while (request := await stream.recv_message()) is not None:
            yield request
            for request in ready_requests(stream):
                yield request

    async def read() -> None:
        try:
            async for request in requests():
                await window.acquire()
                if stopped:
                    return
                try:
                    if ctx.portal is None:
                        raise Reply(Status.UNAVAILABLE, "node is starting or stopping")
                    data = service.build_put(request)  # validation and encoding, on the loop
                except InvalidFieldError as exc:
                    queue.put_nowait(Reply(Status.INVALID_ARGUMENT, str(exc)))
                    return
                except Reply as r:
                    queue.put_nowait(r)
                    return
                fut: asyncio.Future[Any] = loop.create_future()
                ctx.portal.post(ctx.submit, data, fut, loop)
                queue.put_nowait((request, fut))
        except (InvalidFieldError, GRPCError) as exc:  # a request that does not decode
            reply = decode_failure(exc)
            if reply is None:
                if not isinstance(exc, GRPCError):
                    raise
                # The transport's own refusal of a message (a compressed one: UNIMPLEMENTED).
                reply = Reply(exc.status, exc.message or exc.status.name)
            queue.put_nowait(reply)
            return
        except Exception as exc:  # the call must still end with a status
            log.warning("reading a put stream failed: %r", exc)
            queue.put_nowait(Reply(Status.UNAVAILABLE, "outcome unknown: reading the stream "
                                   f"failed ({type(exc).__name__})"))
            return
        queue.put_nowait(None)

    held: list[StreamItem] = []  # taken from the queue, not answered yet

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
                replies.append(service.respond_put(request, result))
                if queue.empty():
                    item = _NOTHING
                    break
                item = queue.get_nowait()
                if not isinstance(item, tuple) or not item[1].done():
                    break  # answered on the next round
            held[:] = [item]
            if replies:
                await send_messages(stream, replies)
                for _ in replies:
                    window.release()
            if failure is not None:
                stopped = True  # nothing more is proposed once the reader sees this
                return await settle_after_failure(queue, failure)
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
            await end_stream_call(stream, reply)
        except Exception as exc:  # the connection is gone: no one to tell
            log.debug("could not end a put stream: %r", exc)

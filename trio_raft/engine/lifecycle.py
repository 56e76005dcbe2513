"""Opening and closing an engine: ``open_engine``, the one way an :class:`Engine` exists.

It owns the engine's lifetime. In order: recover the data dir (``opening.py``, in a worker
thread), build the transport when the configuration has none, start the run loop in a nursery
of its own (``loop.py``; every task the engine runs lives under it, docs/architecture.md), yield
the engine, and on the way out close it, detach the transport (cancelling snapshot transfers in
flight) and close the disk, shielded from cancellation. Exceptions leave as themselves
(``trio_raft/_groups.py``; the rules are in docs/api.md): the block's own, the engine's fatal
error once, a group only for two independent failures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from trio_raft._groups import caused_by, sole_failure
from trio_raft.engine.coldstart import OpenReport
from trio_raft.engine.config import OpenConfig, with_defaults
from trio_raft.engine.diskio import DiskRunner
from trio_raft.engine.engine import Engine
from trio_raft.engine.loop import RunLoop
from trio_raft.engine.opening import open_state
from trio_raft.errors import EngineClosedError
from trio_raft.transport.base import ServingTransport, Transport

logger = logging.getLogger(__name__)


def _reported(cfg: OpenConfig, report: OpenReport) -> OpenReport:
    """Log what opening did (one line) and return ``report``."""
    if report.kind == "restart":
        what = ("skipped (the state machine's store holds index "
                f"{report.store_index})" if report.skipped
                else "restored" if report.restored else "none to restore")
        logger.info("opened %s: snapshot at index %d %s; %d entries replayed, %d skipped; "
                    "%.3f s", cfg.data_dir, report.snapshot_index, what,
                    report.entries_replayed, report.entries_skipped, report.seconds)
    else:
        logger.info("opened %s (%s) in %.3f s", cfg.data_dir, report.kind, report.seconds)
    return report


def build_transport(cfg: OpenConfig,
                    num_peers: int) -> tuple[Transport | None, ServingTransport | None]:
    """The transport to use, and the same when the engine built it and must run it: the
    configured one, else a GRPCTransport serving ``local_address`` when there are other
    peers, else none."""
    if cfg.transport is not None:
        return cfg.transport, None
    if num_peers <= 1:
        return None, None
    from trio_raft.transport.grpc import GRPCTransport

    owned = GRPCTransport(local_address=cfg.local_address)
    return owned, owned


@asynccontextmanager
async def open_engine(config: OpenConfig) -> AsyncIterator[Engine]:
    """Open the engine on ``config`` for the block; leaving the block closes it.

    Exceptions arrive as themselves (``docs/api.md``): the block's own exception; the
    engine's fatal error, once, when one stopped it (the block is cancelled then); a group only
    when the block failed and the engine failed independently. Configuration and storage
    errors at open are raised before the block runs.
    """
    cfg = with_defaults(config)
    io = DiskRunner(cfg.blocking_io)
    started = time.perf_counter()
    opened = await io.run(open_state, cfg)
    failure: BaseException | None = None
    yielded = False
    transport: Transport | None = None
    try:
        transport, owned = build_transport(cfg, len(opened.peers))
        loop = RunLoop(cfg, opened, io, transport, owned=owned)
        engine = Engine(loop)
        engine._report = opened.report
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(loop.run, nursery)
                engine._report = _reported(
                    cfg, attrs.evolve(opened.report, seconds=time.perf_counter() - started))
                if not loop.closed:
                    yielded = True
                    try:
                        yield engine
                    finally:
                        await engine.aclose()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            failure = sole_failure(group)
    finally:
        with trio.CancelScope(shield=True):
            if transport is not None:
                await transport.detach()  # in-flight incoming snapshots are cancelled
            await io.run(opened.disk.close)
    fatal = loop.error
    if fatal is not None:
        if failure is None or isinstance(failure, trio.Cancelled) or caused_by(failure, fatal):
            raise fatal
        raise BaseExceptionGroup("the engine failed and so did the block", [fatal, failure])
    if failure is not None:
        raise failure
    if not yielded:
        raise EngineClosedError("engine stopped during startup")

"""Factory: engine-wide tunables applied to every engine it creates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs

from trio_raft.engine.config import (
    DEFAULT_ELECTION_TICK,
    DEFAULT_HEARTBEAT_TICK,
    DEFAULT_MAX_INFLIGHT_MSG,
    DEFAULT_MAX_SIZE_PER_MSG,
    DEFAULT_TICK_INTERVAL,
    OpenConfig,
)
from trio_raft.engine.engine import Engine
from trio_raft.engine.lifecycle import open_engine


@attrs.frozen
class FactoryConfig:
    tick_interval: float = DEFAULT_TICK_INTERVAL
    heartbeat_tick: int = DEFAULT_HEARTBEAT_TICK
    election_tick: int = DEFAULT_ELECTION_TICK
    max_size_per_msg: int = DEFAULT_MAX_SIZE_PER_MSG
    max_inflight_msg: int = DEFAULT_MAX_INFLIGHT_MSG
    raft_cipher: Any = None
    raft_cutover_index: Callable[[], int] | None = None


class Factory:
    """Opens engines with the factory's tunables; ``engine_type()`` names the engine
    (``"trio_raft"``) for applications that support several."""

    def __init__(self, config: FactoryConfig | None = None) -> None:
        self.config = config or FactoryConfig()

    def engine_type(self) -> str:
        return "trio_raft"

    def set_raft_envelope(self, cipher: Any, cutover: Callable[[], int] | None) -> None:
        self.config = attrs.evolve(self.config, raft_cipher=cipher, raft_cutover_index=cutover)

    def open_config(self, cfg: OpenConfig) -> OpenConfig:
        c = self.config
        return attrs.evolve(
            cfg,
            tick_interval=c.tick_interval,
            heartbeat_tick=c.heartbeat_tick,
            election_tick=c.election_tick,
            max_size_per_msg=c.max_size_per_msg,
            max_inflight_msg=c.max_inflight_msg,
            raft_cipher=c.raft_cipher if c.raft_cipher is not None else cfg.raft_cipher,
            raft_cutover_index=c.raft_cutover_index
            if c.raft_cutover_index is not None
            else cfg.raft_cutover_index,
        )

    @asynccontextmanager
    async def create(self, cfg: OpenConfig) -> AsyncIterator[Engine]:
        async with open_engine(self.open_config(cfg)) as engine:
            yield engine

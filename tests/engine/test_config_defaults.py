"""The defaults docs/api.md states are the code's defaults, and the 0-or-less rule it states
holds."""

from __future__ import annotations

import pathlib

import attrs
import pytest

import trio_raft
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.engine.config import lease_duration, with_defaults

API_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_documented_defaults():
    c = trio_raft.OpenConfig()
    assert (c.tick_interval, c.heartbeat_tick, c.election_tick) == (0.01, 10, 100)
    assert (c.max_size_per_msg, c.max_inflight_msg) == (1 << 20, 1024)
    assert (c.snapshot_every, c.snapshot_catchup_entries) == (10_000, 5_000)
    assert c.commit_broadcast_delay == 0.002
    assert c.pre_vote and c.parallel_leader_write
    assert not c.bootstrap and not c.join_as_learner and not c.blocking_io
    assert c.transport is None and c.raft_cipher is None and c.raft_cutover_index is None
    assert c.observer is None and c.test_persist_delay is None and c.rng_seed is None
    assert c.peers == () and c.local_id == "" and c.local_address == ""
    assert lease_duration(c) == pytest.approx(100 * 0.01 - 0.3)


def test_every_field_is_in_the_api_table():
    text = API_MD.read_text()
    for field in attrs.fields(trio_raft.OpenConfig):
        if field.name in ("node_id", "bootstrap_seed"):
            continue  # documented with the peers (derived / advanced)
        assert f"`{field.name}`" in text, field.name


def test_zero_or_negative_tunables_take_the_defaults():
    zero = trio_raft.OpenConfig(local_id="n1", tick_interval=0, heartbeat_tick=-1,
                                election_tick=0, max_size_per_msg=-5, max_inflight_msg=0,
                                snapshot_every=0)
    c = with_defaults(zero)
    assert (c.tick_interval, c.heartbeat_tick, c.election_tick) == (0.01, 10, 100)
    assert (c.max_size_per_msg, c.max_inflight_msg) == (1 << 20, 1024)
    assert c.snapshot_every == 1
    assert c.node_id == trio_raft.derive_node_id("n1")


@pytest.mark.parametrize("field", ["snapshot_catchup_entries", "commit_broadcast_delay"])
async def test_negative_values_without_a_default_are_refused(tmp_path, field):
    with pytest.raises(errors.ConfigError, match=field):
        async with trio_raft.open_engine(cfg(tmp_path, **{field: -1})):
            pass

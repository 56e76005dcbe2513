"""A single-node engine end to end: propose, reads, snapshots, config validation, lifecycle."""

from __future__ import annotations

import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from trio_raft import OpenConfig, State, errors


def cfg(tmp_path, fsm=None, **kw):
    base = dict(
        local_id="n1",
        local_address="127.0.0.1:7001",
        data_dir=str(tmp_path / "n1"),
        bootstrap=True,
        state_machine=fsm if fsm is not None else KV(),
        tick_interval=0.01,
        heartbeat_tick=1,
        election_tick=10,
    )
    base.update(kw)
    return OpenConfig(**base)


async def test_single_node_propose_and_read(tmp_path):
    fsm = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        assert engine.state() is State.LEADER  # usable at once
        res = await engine.propose(b"set k v1")
        assert res.response is None
        res2 = await engine.propose(b"set k v2")
        assert res2.response == "v1"
        assert res2.commit_index == res.commit_index + 1
        idx = await engine.linearizable_read()
        assert idx >= res2.commit_index
        assert engine.applied_index() >= idx
        await engine.verify_leader()
        await engine.check_serving()
        assert fsm.data == {"k": "v2"}
        assert fsm.apply_index == res2.commit_index


async def test_status_fields(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        await engine.propose(b"set a 1")
        st = engine.status()
        assert st.state is State.LEADER
        assert st.leader == trio_raft.LeaderInfo("n1", "127.0.0.1:7001")
        assert st.term >= 1
        assert st.commit_index == st.applied_index == st.last_log_index
        assert st.fsm_pending == 0
        assert st.num_peers == 0
        assert st.last_contact == 0
        assert st.configuration_index == 1
        assert st.last_snapshot_index == 1
        assert st.lead_transferee == 0
        assert not st.pending_conf_change
        # election timeout 10 x 10 ms is shorter than the 300 ms safety margin: no lease.
        assert engine.lease_duration() == 0.0
        assert engine.last_quorum_ack() is not None


async def test_configuration(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        conf = await engine.configuration()
        assert conf.servers == (trio_raft.Server("n1", "127.0.0.1:7001", "voter"),)


async def test_propose_with_cancelled_scope_does_not_enqueue(tmp_path):
    fsm = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        with trio.CancelScope() as cs:
            cs.cancel()
            await engine.propose(b"set never 1")
        assert cs.cancelled_caught
        await engine.propose(b"set after 1")
        assert "never" not in fsm.data
        assert len(engine._loop.pending.proposals) == 0


async def test_cancel_while_waiting_leaves_no_waiter(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        async with trio.open_nursery() as nursery:
            async def reader():
                await engine.propose(b"set x 1")

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        await engine.propose(b"set y 1")
        assert len(engine._loop.pending.proposals) == 0
        assert len(engine._loop.reads) == 0


async def test_close_and_reopen_keeps_state(tmp_path):
    fsm = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        for i in range(20):
            await engine.propose(f"set k{i} {i}".encode())
        last = engine.applied_index()
    assert engine.state() is State.SHUTDOWN
    with pytest.raises(errors.EngineClosedError):
        await engine.propose(b"set late 1")
    fsm2 = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm2)) as engine:
        assert engine.applied_index() >= last
        assert fsm2.data == fsm.data
        await engine.propose(b"set k0 again")
        assert fsm2.data["k0"] == "again"


async def test_close_fails_pending_reads_with_engine_closed(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        await engine.aclose()
        await engine.aclose()  # idempotent
        with pytest.raises(errors.EngineClosedError):
            await engine.linearizable_read()
    assert engine.state() is State.SHUTDOWN


async def test_periodic_snapshot_and_compaction(tmp_path):
    fsm = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm, snapshot_every=50,
                                         snapshot_catchup_entries=10)) as engine:
        for i in range(130):
            await engine.propose(f"set k{i % 7} {i}".encode())
        with trio.fail_after(10):
            while engine.status().last_snapshot_index < 100:
                await trio.sleep(0.01)
        assert engine._loop.storage.first_index() > 1
    fsm2 = KV()
    async with trio_raft.open_engine(cfg(tmp_path, fsm2, snapshot_every=50)) as engine:
        assert fsm2.data == fsm.data


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        (dict(local_id="", node_id=0), errors.NodeIDRequiredError),
        (dict(data_dir=""), errors.DataDirRequiredError),
        (dict(state_machine=None), errors.StateMachineUnsetError),
        (dict(election_tick=2, heartbeat_tick=2), errors.ConfigError),
        (dict(bootstrap=False), errors.NoPeersConfiguredError),
    ],
)
async def test_config_validation(tmp_path, kw, exc):
    c = cfg(tmp_path, **kw)
    if "state_machine" in kw:
        import attrs

        c = attrs.evolve(c, state_machine=None)
    with pytest.raises(exc):
        async with trio_raft.open_engine(c):
            pass


async def test_callbacks_fire_and_deregister(tmp_path):
    events: list[str] = []
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        def boom():
            raise RuntimeError("callback failure is contained")

        d1 = engine.register_leader_loss_callback(lambda: events.append("lost1"))
        engine.register_leader_loss_callback(boom)
        fn = lambda: events.append("lost2")  # noqa: E731
        d2 = engine.register_leader_loss_callback(fn)
        engine.register_leader_loss_callback(fn)
        d2()
        d2()  # idempotent, removes only that registration
        d1()
        assert engine.register_leader_loss_callback(None)() is None
    assert events == ["lost2"]


async def test_default_lease_duration_and_single_node_ack(tmp_path):
    c = cfg(tmp_path, tick_interval=0, heartbeat_tick=0, election_tick=0)
    async with trio_raft.open_engine(c) as engine:
        assert engine.lease_duration() == pytest.approx(0.7)
        ack = engine.last_quorum_ack()
        assert ack is not None and ack <= trio.current_time()
        assert engine.lease_valid()


def test_derive_node_id_and_parse_peers():
    assert trio_raft.derive_node_id("") == 0
    assert trio_raft.derive_node_id("n1") == trio_raft.derive_node_id("n1") != 0
    peers = trio_raft.parse_peers(" n1 = h:1 ,, n2=h:2")
    assert [(p.id, p.address) for p in peers] == [("n1", "h:1"), ("n2", "h:2")]
    assert trio_raft.parse_peers("") == []
    for bad in ("n1", "=h:1", "n1="):
        with pytest.raises(errors.PeerFormatInvalidError):
            trio_raft.parse_peers(bad)


async def test_bootstrap_seed_mismatch_is_refused(tmp_path):
    seed = [trio_raft.Peer("n1", "127.0.0.1:7001")]
    async with trio_raft.open_engine(cfg(tmp_path, bootstrap_seed=seed)) as engine:
        await engine.propose(b"set a 1")
    other = [trio_raft.Peer("n1", "127.0.0.1:7001"), trio_raft.Peer("n9", "127.0.0.1:7009")]
    with pytest.raises(errors.ClusterMismatchError, match="bootstrap seed differs"):
        async with trio_raft.open_engine(cfg(tmp_path, bootstrap_seed=other)):
            pass
    # The same seed reopens fine.
    async with trio_raft.open_engine(cfg(tmp_path, bootstrap_seed=seed)) as engine:
        assert engine.applied_index() >= 3


def test_snapshot_conf_state_must_match_peers():
    from trio_raft.core.messages import ConfState
    from trio_raft.engine.opening import validate_conf_state

    peers = [trio_raft.Peer("a", "h:1", 1, "voter"), trio_raft.Peer("b", "h:2", 2, "learner")]
    validate_conf_state(ConfState(voters=[1], learners=[2]), peers)
    with pytest.raises(errors.ClusterMismatchError, match="expected 1 voters got 2"):
        validate_conf_state(ConfState(voters=[1, 3], learners=[2]), peers)
    with pytest.raises(errors.ClusterMismatchError, match="learner 4 not present"):
        validate_conf_state(ConfState(voters=[1], learners=[4]), peers)
    with pytest.raises(errors.ClusterMismatchError, match="joint"):
        validate_conf_state(ConfState(voters=[1], voters_outgoing=[2]), peers)


async def test_propose_nowait_reports_through_the_callback(tmp_path, caplog):
    import outcome

    fsm = KV()
    results: list[outcome.Outcome[trio_raft.ProposalResult]] = []
    done = trio.Event()

    def on_done(res: outcome.Outcome[trio_raft.ProposalResult]) -> None:
        results.append(res)
        if len(results) == 3:
            done.set()

    def broken(res: object) -> None:
        raise RuntimeError("callback bug")

    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        first = await engine.propose(b"set k v0")
        engine.propose_nowait(b"set k v1", on_done)
        engine.propose_nowait(b"set k v2", broken)  # logged; the engine keeps serving
        engine.propose_nowait(b"set k v3", on_done)
        engine.propose_nowait(b"set j 1", on_done)
        with trio.fail_after(5):
            await done.wait()
        values = [r.unwrap() for r in results]
        assert [v.commit_index for v in values] == [first.commit_index + i for i in (1, 3, 4)]
        assert values[0].response == "v0" and values[1].response == "v2"
        assert fsm.data == {"k": "v3", "j": "1"}
        assert "proposal completion callback failed" in caplog.text
        assert (await engine.propose(b"set after 1")).commit_index == first.commit_index + 5
    with pytest.raises(errors.EngineClosedError):
        engine.propose_nowait(b"set late 1", on_done)
    assert len(results) == 3


async def test_propose_nowait_callbacks_all_fire_by_close(tmp_path):
    import outcome

    results: list[outcome.Outcome[trio_raft.ProposalResult]] = []
    async with trio_raft.open_engine(cfg(tmp_path)) as engine:
        for i in range(50):
            engine.propose_nowait(b"set k %d" % i, results.append)
        await engine.aclose()
    # Each proposal was answered exactly once: applied, or failed by the close (queued: not
    # applied; seen by raft: outcome unknown).
    assert len(results) == 50
    for r in results:
        if isinstance(r, outcome.Error):
            assert isinstance(r.error, errors.EngineClosedError
                              | errors.EngineClosedWhileWaitingError)

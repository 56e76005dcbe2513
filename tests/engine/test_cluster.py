"""Multi-node engine behaviour over a MemoryNetwork under MockClock."""

from __future__ import annotations

import pytest
import trio

from tests.engine.kv import KV
from trio_raft import State, TransferTarget, errors
from trio_raft.testing.cluster import open_memory_cluster, wait_replicated


async def test_failover_after_leader_crash(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        res = await leader.propose(b"set a 1")
        old = c.leader_name()
        assert old is not None
        await c.stop(old)
        new_leader = await c.wait_for_leader(exclude=old)
        res2 = await new_leader.propose(b"set b 2")
        assert res2.commit_index > res.commit_index
        await c.start(old)
        await c.wait_applied(res2.commit_index)
        assert c.nodes[old].fsm.data == {"a": "1", "b": "2"}


async def test_minority_partition_cannot_commit_and_loses_lease(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV, election_tick=20) as c:
        leader = await c.wait_for_leader()
        await leader.propose(b"set a 1")
        name = c.leader_name()
        others = [n for n in c.nodes if n != name]
        with trio.fail_after(5):
            while leader.last_quorum_ack() is None:
                await trio.sleep(0.01)
        lost: list[int] = []
        leader.register_leader_loss_callback(lambda: lost.append(1))
        c.partition([name], others)
        with pytest.raises(errors.LeadershipLostError):  # it waited in raft: outcome unknown
            with trio.fail_after(30):
                await leader.propose(b"set never 1")
        assert leader.state() is not State.LEADER
        assert leader.last_quorum_ack() is None
        assert lost == [1]
        new = await c.wait_for_leader(exclude=name)
        await new.propose(b"set c 3")
        c.heal()
        await c.wait_applied(new.applied_index())
        assert "never" not in c.nodes[name].fsm.data


async def test_leader_reports_each_peers_replication(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        others = sorted(n for n in c.nodes if n != name)
        res = await leader.propose(b"set a 1")
        for n in others:
            await wait_replicated(leader, n, res.commit_index)
        prs = leader.replication()
        assert sorted(prs) == others
        for n in others:
            assert prs[n].id == n
            assert prs[n].state == "replicate"
            assert not prs[n].learner
            assert prs[n].next == prs[n].match + 1
            assert c.nodes[n].engine.replication() == {}
        cut, kept = others
        c.partition([cut], [name, kept])
        res2 = await leader.propose(b"set b 2")
        await wait_replicated(leader, kept, res2.commit_index)
        assert leader.replication()[cut].match < res2.commit_index
        c.heal()
        await wait_replicated(leader, cut, res2.commit_index)


async def test_follower_rejects_writes_and_serves_linearizable_reads(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        handle = next(h for h in c.running() if h.engine.state() is State.FOLLOWER)
        follower = handle.engine
        with pytest.raises(errors.NotLeaderError):
            await follower.propose(b"set a 1")
        with pytest.raises(errors.NotLeaderError):
            await follower.verify_leader()
        with pytest.raises(errors.NotLeaderError):
            await follower.check_serving()
        assert follower.leader().id == c.leader_name()
        # A follower read: the leader confirms the read index, the follower applies up to it
        # and serves the read from its own state machine (docs/api.md, reads).
        written = await leader.propose(b"set a 2")
        index = await follower.linearizable_read()
        assert index >= written.commit_index
        assert follower.applied_index() >= index and handle.fsm.data["a"] == "2"


async def test_learner_add_catch_up_promote_remove(tmp_path, clock):
    async with open_memory_cluster(tmp_path, ["n1", "n2", "n3"], KV) as c:
        leader = await c.wait_for_leader()
        for i in range(10):
            await leader.propose(f"set k{i} {i}".encode())
        st = leader.status()
        cfg_index = st.configuration_index
        # n4 joins empty (no bootstrap), with everyone's address.
        c.nodes.setdefault("n4", None)  # type: ignore[arg-type]
        del c.nodes["n4"]
        joiner = await c.start("n4", bootstrap=False, peers=["n1", "n2", "n3", "n4"],
                               join_as_learner=True)
        assert (await joiner.configuration()).servers == ()
        with pytest.raises(errors.ConfigIndexMismatchError):
            await leader.add_learner("n4", c.nodes["n4"].address, prev_index=cfg_index + 99)
        idx = await leader.add_learner("n4", c.nodes["n4"].address, prev_index=cfg_index)
        assert leader.status().configuration_index == idx
        warm = await leader.propose(b"set warm 1")
        await c.wait_applied(warm.commit_index, ["n4"])
        assert c.nodes["n4"].fsm.data["warm"] == "1"
        servers = (await leader.configuration()).servers
        assert [s.suffrage for s in servers if s.id == "n4"] == ["learner"]
        with pytest.raises(errors.PromoteLearnerMinAppliedZeroError):
            await leader.promote_learner("n4", idx, 0)
        with pytest.raises(errors.PromoteLearnerNotCaughtUpError):
            await leader.promote_learner("n4", idx, warm.commit_index + 1000)
        with pytest.raises(errors.PromoteLearnerNotLearnerError):
            await leader.promote_learner("n2", idx, 1)
        await wait_replicated(leader, "n4", warm.commit_index)
        idx2 = await leader.promote_learner("n4", idx, warm.commit_index)
        servers = (await leader.configuration()).servers
        assert {s.id: s.suffrage for s in servers}["n4"] == "voter"
        assert c.nodes["n4"].engine is not None
        assert errors.FailedPreconditionError  # the family exists
        idx3 = await leader.remove_server("n4", idx2)
        assert idx3 > idx2
        with trio.fail_after(10):
            await c.nodes["n4"].stopped.wait()
        assert [s.id for s in (await leader.configuration()).servers] == ["n1", "n2", "n3"] or (
            len((await leader.configuration()).servers) == 3
        )
        res = await leader.propose(b"set after 1")
        await c.wait_applied(res.commit_index, ["n1", "n2", "n3"])


async def test_membership_fences(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        cfg_index = leader.status().configuration_index
        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def add(name: str) -> None:
                try:
                    results.append(await leader.add_learner(name, f"mem-{name}:1", cfg_index))
                except errors.RaftError as exc:
                    results.append(exc)

            nursery.start_soon(add, "x1")
            nursery.start_soon(add, "x2")
        kinds = sorted(type(r).__name__ for r in results)
        assert kinds in (
            ["MembershipChangePendingError", "int"],
            ["ConfigIndexMismatchError", "int"],
        )
        with pytest.raises(errors.TransportPeerUnknownError):
            await leader.remove_server("nobody")


async def test_transfer_leadership_variants(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        await leader.propose(b"set a 1")
        acquired: list[str] = []
        for h in c.running():
            h.engine.register_leader_acquired_callback(lambda n=h.name: acquired.append(n))
        target = next(n for n in c.nodes if n != name)
        with pytest.raises(errors.LeadershipTransferTargetError):
            await leader.transfer_leadership_to_server(name)
        with pytest.raises(errors.TransportPeerUnknownError):
            await leader.transfer_leadership_to_server("nobody")
        await leader.transfer_leadership_to_server(target)
        new = await c.wait_for_leader()
        assert c.leader_name() == target
        assert acquired == [target]
        with pytest.raises(errors.NotLeaderError):
            await leader.transfer_leadership()
        await new.transfer_leadership()
        await c.wait_for_leader()
        assert c.leader_name() != target
        cur = c.engine(c.leader_name())
        others = [TransferTarget(n, "") for n in c.nodes if n != c.leader_name()]
        await cur.transfer_leadership_to_server_if_eligible(others, 0)
        await c.wait_for_leader()
        assert c.leader_name() == others[0].id


async def test_transfer_if_eligible_gates(tmp_path, clock):
    # A long election timeout keeps "recently active" from being reset during the test.
    async with open_memory_cluster(tmp_path, 3, KV, election_tick=1000) as c:
        leader = await c.wait_for_leader(timeout=120)
        name = c.leader_name()
        lagging, healthy = [n for n in c.nodes if n != name]
        await leader.propose(b"set a 1")
        c.partition([lagging], [name, healthy])
        for i in range(5):
            await leader.propose(f"set b{i} 1".encode())
        with pytest.raises(errors.LeadershipTransferTargetNotCaughtUpError):
            await leader.transfer_leadership_to_server_if_eligible([TransferTarget(lagging)], 0)
        assert leader.state() is State.LEADER
        # Candidates are tried in order: the lagging one fails its gate, the healthy one wins.
        await leader.transfer_leadership_to_server_if_eligible(
            [TransferTarget(lagging), TransferTarget(healthy)], 0
        )
        await c.wait_for_leader(timeout=120)
        assert c.leader_name() == healthy


async def test_transfer_to_unreachable_target_aborts_and_fails_fast(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        target = next(n for n in c.nodes if n != name)
        await leader.propose(b"set a 1")
        # Cut the target off and make it lag so the leader must wait for catch-up.
        c.partition([target], [n for n in c.nodes if n != target])
        for i in range(5):
            await leader.propose(f"set b{i} 1".encode())
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def transfer() -> None:
                try:
                    await leader.transfer_leadership_to_server(target)
                except errors.RaftError as exc:
                    outcome.append(exc)

            nursery.start_soon(transfer)
            with trio.fail_after(5):
                while leader.status().lead_transferee == 0:
                    await trio.sleep(0.01)
            with pytest.raises(errors.LeadershipTransferInProgressError):
                await leader.propose(b"set during 1")
            with pytest.raises(errors.LeadershipTransferInProgressError):
                await leader.linearizable_read()
        assert len(outcome) == 1
        assert isinstance(outcome[0], errors.LeadershipTransferAbortedError)
        assert leader.state() is State.LEADER
        c.heal()
        await leader.propose(b"set after 1")


async def test_whole_cluster_restart_keeps_acknowledged_writes(tmp_path, clock):
    acked: dict[str, str] = {}
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        for i in range(30):
            await leader.propose(f"set k{i} v{i}".encode())
            acked[f"k{i}"] = f"v{i}"
        for n in list(c.nodes):
            await c.stop(n)
        for n in list(c.nodes):
            await c.start(n)
        leader = await c.wait_for_leader()
        idx = await leader.linearizable_read()
        await c.wait_applied(idx)
        for h in c.running():
            assert h.fsm.data == acked


async def test_step_queue_and_dispatch_counters(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        other = next(n for n in c.nodes if n != name)
        await c.stop(other)
        for i in range(3):
            await leader.propose(f"set k{i} 1".encode())
        await trio.sleep(1)
        assert leader.dispatch_error_count() > 0
        assert leader.dispatch_error_counts_by_code().get("Unavailable", 0) > 0
        assert sum(leader.dispatch_error_counts_by_code().values()) == leader.dispatch_error_count()
        assert leader.step_queue_full_count() == 0
        assert leader.dispatch_drop_count() >= 0


async def test_lease_valid_then_invalidated_by_partition(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV, heartbeat_tick=10, election_tick=100) as c:
        leader = await c.wait_for_leader(timeout=60)
        name = c.leader_name()
        assert leader.lease_duration() == pytest.approx(0.7)
        await leader.propose(b"set a 1")
        await trio.sleep(0.3)
        assert leader.lease_valid()
        ack = leader.last_quorum_ack()
        assert ack is not None and trio.current_time() - ack < leader.lease_duration()
        c.partition([name], [n for n in c.nodes if n != name])
        # No quorum answers any more: the lease runs out before anyone else can be elected.
        await trio.sleep(leader.lease_duration() + 0.05)
        assert not leader.lease_valid()
        new = await c.wait_for_leader(timeout=60, exclude=name)
        assert new is not leader
        with trio.fail_after(10):
            while leader.state() is State.LEADER:
                await trio.sleep(0.05)
        assert leader.last_quorum_ack() is None


async def test_inbound_queue_full_is_counted_and_refused(tmp_path, clock):
    from trio_raft.core.messages import Message, MessageType

    async with open_memory_cluster(tmp_path, 3, KV) as c:
        await c.wait_for_leader()
        follower = next(h.engine for h in c.running() if h.engine.state() is State.FOLLOWER)
        leader_id = next(h.node_id for h in c.running() if h.engine.state() is State.LEADER)
        me = next(h.node_id for h in c.running() if h.engine is follower)
        refused = 0
        # The handler queues without yielding, so the priority queue fills before the loop runs.
        for _ in range(1100):
            m = Message(MessageType.HEARTBEAT, to=me, from_=leader_id, term=1)
            try:
                await follower._loop.links.handle_inbound(m)
            except errors.StepQueueFullError:
                refused += 1
        assert refused == 1100 - 1024
        assert follower.step_queue_full_count() == refused


async def test_wiped_member_rejoins_through_snapshot(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV, snapshot_every=20,
                                   snapshot_catchup_entries=5) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        victim = next(n for n in c.nodes if n != name)
        for i in range(60):
            await leader.propose(f"set k{i} v{i}".encode())
        assert leader.status().last_snapshot_index >= 40
        # Fenced replacement: remove, wipe, re-add under the same id as a learner, promote.
        idx = await leader.remove_server(victim)
        with trio.fail_after(10):
            await c.nodes[victim].stopped.wait()
        c.wipe(victim)
        joiner = await c.start(victim, bootstrap=False)
        assert (await joiner.configuration()).servers == ()
        idx = await leader.add_learner(victim, c.nodes[victim].address, idx)
        warm = await leader.propose(b"set warm 1")
        await c.wait_applied(warm.commit_index, [victim])
        h = c.nodes[victim]
        assert h.fsm.data == c.nodes[name].fsm.data
        assert joiner.status().last_snapshot_index >= 40  # installed a snapshot, not a replay
        await wait_replicated(leader, victim, warm.commit_index)
        await leader.promote_learner(victim, idx, warm.commit_index)
        voters = [s.id for s in (await leader.configuration()).servers if s.suffrage == "voter"]
        assert victim in voters


async def test_join_as_learner_refuses_to_become_a_voter(tmp_path, clock):
    """A node started with join_as_learner that is added with add_voter (an operator's
    mistake) stops with JoinedAsVoterError before it installs anything; the cluster goes on."""
    import trio_raft

    before = trio_raft.join_role_violation_count()
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        idx = leader.status().configuration_index
        joiner = await c.start("n4", bootstrap=False, peers=["n1", "n2", "n3", "n4"],
                               join_as_learner=True)
        await leader.add_voter("n4", c.nodes["n4"].address, idx)
        with trio.fail_after(10):
            await c.nodes["n4"].stopped.wait()
        assert isinstance(c.nodes["n4"].error, errors.JoinedAsVoterError)
        assert joiner.state() is State.SHUTDOWN
        assert joiner.applied_index() == 0 and c.nodes["n4"].fsm.data == {}
        assert trio_raft.join_role_violation_count() == before + 1
        res = await leader.propose(b"set x 1")  # 3 of 4 voters still make a quorum
        assert res.commit_index > idx
        # Restarted with the same flag, it refuses again (the configuration is unchanged).
        await c.start("n4", bootstrap=False, peers=["n1", "n2", "n3", "n4"],
                      join_as_learner=True)
        with trio.fail_after(10):
            await c.nodes["n4"].stopped.wait()
        assert isinstance(c.nodes["n4"].error, errors.JoinedAsVoterError)


async def test_join_as_learner_never_bootstraps(tmp_path):
    from tests.engine.test_single_node import cfg

    with pytest.raises(errors.JoinAsLearnerBootstrapError):
        async with trio_raft_open(cfg(tmp_path, join_as_learner=True, bootstrap=True)):
            pass
    # Even when it is the only peer it knows of, it waits to be added instead of forming a
    # cluster of its own.
    me = trio_raft_peer("n1", "127.0.0.1:7001")
    async with trio_raft_open(cfg(tmp_path, join_as_learner=True, bootstrap=False,
                                  peers=[me])) as engine:
        assert (await engine.configuration()).servers == ()
        with trio.move_on_after(1):
            while engine.state() is not State.LEADER:
                await trio.sleep(0.05)
        assert engine.state() is not State.LEADER
        assert engine.applied_index() == 0


def trio_raft_open(config):  # type: ignore[no-untyped-def]
    import trio_raft

    return trio_raft.open_engine(config)


def trio_raft_peer(id: str, address: str):  # type: ignore[no-untyped-def]
    import trio_raft

    return trio_raft.Peer(id, address)


async def test_factory_applies_its_tunables(tmp_path):
    import trio_raft

    factory = trio_raft.Factory(trio_raft.FactoryConfig(tick_interval=0.005, heartbeat_tick=2,
                                                        election_tick=400))
    assert factory.engine_type() == "trio_raft"
    cfg = trio_raft.OpenConfig(local_id="n1", local_address="127.0.0.1:1",
                               data_dir=str(tmp_path / "n1"), bootstrap=True, state_machine=KV())
    async with factory.create(cfg) as engine:
        assert engine.lease_duration() == pytest.approx(400 * 0.005 - 0.3)
        await engine.propose(b"set a 1")


async def test_leader_applies_before_sending_the_new_commit_index(tmp_path, clock):
    """A leader answers proposers before telling followers of the commit; a configuration
    change keeps the send-first order so the peer it may remove still hears of its commit."""
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name = c.leader_name()
        assert name is not None
        handle = c.nodes[name]
        events: list[tuple[str, int]] = []
        dispatcher = leader._loop.dispatcher  # white box: the leader's outbound lanes
        real_send = dispatcher.send

        def send(m):  # type: ignore[no-untyped-def]
            if m.type.name == "APP" and not m.entries:
                events.append(("commit-sent", m.commit))
            real_send(m)

        real_apply = handle.fsm.apply

        def apply(data: bytes):  # type: ignore[no-untyped-def]
            events.append(("applied", handle.fsm.apply_index))
            return real_apply(data)

        dispatcher.send = send  # type: ignore[method-assign]
        handle.fsm.apply = apply  # type: ignore[method-assign]
        res = await leader.propose(b"set a 1")
        await c.wait_applied(res.commit_index)
        idx = res.commit_index
        assert ("applied", idx) in events
        first_commit = next(i for i, (kind, v) in enumerate(events)
                            if kind == "commit-sent" and v >= idx)
        assert events.index(("applied", idx)) < first_commit

        events.clear()
        others = [n for n in c.nodes if n != name]
        st = leader.status()
        conf_idx = await leader.remove_server(others[0], st.configuration_index)
        with trio.fail_after(10):
            await c.nodes[others[0]].stopped.wait()
        sent = [v for kind, v in events if kind == "commit-sent" and v >= conf_idx]
        assert sent, "followers were told the configuration change committed"


async def test_propose_nowait_on_a_follower_reports_not_leader(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        await c.wait_for_leader()
        follower = next(h.engine for h in c.running() if h.engine.state() is State.FOLLOWER)
        got: list = []
        answered = trio.Event()

        def on_done(res) -> None:  # type: ignore[no-untyped-def]
            got.append(res)
            answered.set()

        follower.propose_nowait(b"set a 1", on_done)
        with trio.fail_after(5):
            await answered.wait()
        assert len(got) == 1
        with pytest.raises(errors.NotLeaderError):
            got[0].unwrap()


async def test_a_late_answer_does_not_renew_the_lease(tmp_path, clock):
    """A follower is credited with the time the leader started the round it echoes, not with
    when its answer arrived: an answer that waited (a paused leader, a slow network) renews
    nothing."""
    from trio_raft.core.messages import Message, MessageType
    from trio_raft.engine.contexts import encode_read_context

    async with open_memory_cluster(tmp_path, 3, KV, heartbeat_tick=10, election_tick=100) as c:
        leader = await c.wait_for_leader(timeout=60)
        name = c.leader_name()
        await leader.propose(b"set a 1")
        with trio.fail_after(5):
            while not leader.lease_valid():
                await trio.sleep(0.01)
        issued = trio.current_time()
        # white box: the newest round the leader started (its lease probes and reads)
        round_id, started = list(leader._loop.reads._started.items())[-1]
        assert started <= issued
        c.partition([name], [n for n in c.nodes if n != name])
        await trio.sleep(leader.lease_duration() + 0.05)
        assert not leader.lease_valid() and leader.state() is State.LEADER
        follower = next(h.engine for n, h in c.nodes.items() if n != name)
        late = Message(MessageType.HEARTBEAT_RESP, leader._loop.node_id, follower._loop.node_id,
                       leader.status().term, context=encode_read_context(round_id))
        leader._loop._step(late)  # white box: the answer arrives now
        assert not leader.lease_valid()
        ack = leader.last_quorum_ack()
        assert ack is not None and ack <= issued

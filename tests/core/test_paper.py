"""Tests keyed to the sections of the Raft paper (Ongaro & Ousterhout, "In Search of an
Understandable Consensus Algorithm"), then targeted tests of the extensions the core implements:
PreVote, CheckQuorum, ReadIndex, learners, conf changes, leadership transfer, snapshots, flow
control and fast back-off.

Clusters boot from a snapshot at index 1 / term 1, so the first election is for term 2 and the new
leader's empty entry lands at index 2.
"""

from __future__ import annotations

import random

import pytest

from tests.core.helpers import Cluster, boot_storage, new_node
from trio_raft.core.errors import ProposalDroppedError
from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.progress import ProgressState
from trio_raft.core.raft import Config, Raft
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage

MT = MessageType
F, C, P, L = StateType.FOLLOWER, StateType.CANDIDATE, StateType.PRE_CANDIDATE, StateType.LEADER


def outbox(c: Cluster, i: int) -> list[Message]:
    return c.drain_node(i)


def elected(n: int = 3, **kw: object) -> Cluster:
    c = Cluster(n, **kw)
    c.campaign(1)
    assert c.state(1) is L
    return c


# ----------------------------------------------------------------------------------------------
# §5.1 terms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [F, C, L])
def test_5_1_higher_term_turns_any_role_into_follower(role: StateType) -> None:
    c = Cluster(3, pre_vote=False)
    if role is L:
        c.campaign(1)
    elif role is C:
        c.nodes[1].campaign()
        outbox(c, 1)
    r = c.nodes[1].raft
    assert r.state is role
    t = r.term + 3
    c.nodes[1].step(Message(MT.APP, to=1, from_=2, term=t, log_term=r.log.last_term(),
                            index=r.log.last_index(), commit=0))
    assert r.state is F and r.term == t and r.lead == 2


def test_5_1_stale_term_message_is_rejected() -> None:
    c = elected()
    r = c.nodes[2].raft
    before = (r.term, r.log.last_index())
    c.nodes[2].step(Message(MT.APP, to=2, from_=3, term=1, index=1, log_term=1,
                            entries=(Entry(1, 2, data=b"stale"),)))
    assert (r.term, r.log.last_index()) == before
    out = outbox(c, 2)
    # the stale sender learns the newer term
    assert [(m.type, m.to, m.term) for m in out] == [(MT.APP_RESP, 3, r.term)]


# ----------------------------------------------------------------------------------------------
# §5.2 leader election
# ----------------------------------------------------------------------------------------------


def test_5_2_nodes_start_as_followers() -> None:
    c = Cluster(3)
    assert all(c.state(i) is F for i in c.nodes)


def test_5_2_leader_broadcasts_heartbeats() -> None:
    c = elected(heartbeat_tick=1)
    c.nodes[1].tick()
    out = outbox(c, 1)
    assert sorted((m.type, m.to) for m in out) == [(MT.HEARTBEAT, 2), (MT.HEARTBEAT, 3)]


@pytest.mark.parametrize("pre_vote", [False, True])
def test_5_2_follower_starts_election_after_timeout(pre_vote: bool) -> None:
    c = Cluster(3, pre_vote=pre_vote)
    node = c.nodes[1]
    for _ in range(2 * 10):
        node.tick()
    out = outbox(c, 1)
    kind = MT.PRE_VOTE if pre_vote else MT.VOTE
    assert sorted((m.type, m.to, m.term) for m in out) == [(kind, 2, 2), (kind, 3, 2)]
    r = node.raft
    if pre_vote:
        assert r.state is P and r.term == 1  # a pre-candidate does not bump its term
    else:
        assert r.state is C and r.term == 2 and r.vote == 1


@pytest.mark.parametrize(
    ("n", "grants", "want"),
    [
        (1, {}, L),
        (3, {2: True}, L),
        (3, {2: True, 3: True}, L),
        (3, {}, C),
        (3, {2: False}, C),
        (3, {2: False, 3: False}, F),
        (5, {2: True, 3: True}, L),
        (5, {2: True}, C),
        (5, {2: False, 3: False, 4: False}, F),
    ],
)
def test_5_2_election_in_one_round(n: int, grants: dict[int, bool], want: StateType) -> None:
    c = Cluster(n, pre_vote=False)
    node = c.nodes[1]
    node.campaign()
    outbox(c, 1)
    for voter, ok in grants.items():
        node.step(Message(MT.VOTE_RESP, to=1, from_=voter, term=2, reject=not ok))
    assert node.raft.state is want


def test_5_2_follower_votes_once_per_term_first_come() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    node = c.nodes[1]
    node.step(Message(MT.VOTE, to=1, from_=2, term=2, index=1, log_term=1))
    node.step(Message(MT.VOTE, to=1, from_=3, term=2, index=1, log_term=1))
    node.step(Message(MT.VOTE, to=1, from_=2, term=2, index=1, log_term=1))  # retry: granted
    out = outbox(c, 1)
    assert [(m.to, m.reject) for m in out] == [(2, False), (3, True), (2, False)]
    assert node.raft.vote == 2


def test_5_2_candidate_falls_back_on_append_from_leader() -> None:
    c = Cluster(3, pre_vote=False)
    node = c.nodes[1]
    node.campaign()
    outbox(c, 1)
    node.step(Message(MT.APP, to=1, from_=2, term=2, index=1, log_term=1))
    assert node.raft.state is F and node.raft.lead == 2


def test_5_2_election_timeouts_are_randomized() -> None:
    seen = set()
    for seed in range(40):
        r = Raft(Config(id=1, storage=boot_storage([1, 2, 3]), rng=random.Random(seed),
                        pre_vote=False))
        ticks = 0
        while r.state is F:
            r.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) > 5


# ----------------------------------------------------------------------------------------------
# §5.3 log replication
# ----------------------------------------------------------------------------------------------


def test_5_3_leader_replicates_and_commits_with_majority() -> None:
    c = elected()
    leader = c.nodes[1]
    leader.propose(b"x")
    out = outbox(c, 1)
    apps = [m for m in out if m.type is MT.APP]
    assert sorted(m.to for m in apps) == [2, 3]
    for m in apps:
        assert (m.index, m.log_term, m.commit) == (2, 2, 2)
        assert [(e.index, e.term, e.data) for e in m.entries] == [(3, 2, b"x")]
    assert c.committed(1) == 2  # not yet acknowledged
    c.nodes[1].step(Message(MT.APP_RESP, to=1, from_=2, term=2, index=3))
    assert c.committed(1) == 3  # leader + node 2 are a majority
    out = outbox(c, 1)
    assert [e.data for e in c.applied[1]][-1] == b"x"
    # followers learn the new commit index with the next append
    assert {m.to: m.commit for m in out if m.type is MT.APP}[2] == 3


def test_5_3_leader_does_not_commit_without_majority() -> None:
    c = elected(5)
    c.cut = {(1, j) for j in (3, 4, 5)}
    c.propose(1, b"x")
    assert c.committed(1) == 2
    c.heal()
    c.tick(1, 1)  # heartbeat -> responses -> catch up
    assert c.committed(1) == 3


def test_5_3_follower_commits_what_the_leader_says() -> None:
    c = elected()
    c.propose(1, b"a")
    c.propose(1, b"b")
    for i in (2, 3):
        assert c.committed(i) == 4 or c.committed(i) == 3
    c.tick(1)
    assert [c.data_applied(i) for i in (1, 2, 3)] == [[b"a", b"b"]] * 3


def test_5_3_follower_rejects_mismatched_prev_entry_with_hint() -> None:
    c = elected()
    node = c.nodes[2]
    node.step(Message(MT.APP, to=2, from_=1, term=2, index=5, log_term=2,
                      entries=(Entry(2, 6),)))
    (resp,) = outbox(c, 2)
    assert resp.type is MT.APP_RESP and resp.reject and resp.index == 5
    assert resp.reject_hint == node.raft.log.last_index()


def test_5_3_follower_truncates_conflicting_suffix() -> None:
    s = boot_storage([1, 2, 3])
    s.append([Entry(1, 2, data=b"old2"), Entry(1, 3, data=b"old3")])
    node = new_node(2, s)
    node.step(Message(MT.APP, to=2, from_=1, term=3, index=2, log_term=1,
                      entries=(Entry(3, 3, data=b"new3"), Entry(3, 4, data=b"new4"))))
    log = node.raft.log
    assert [(e.index, e.term, e.data) for e in log.entries(2)] == [
        (2, 1, b"old2"), (3, 3, b"new3"), (4, 3, b"new4")]


def test_5_3_leader_brings_divergent_followers_in_line() -> None:
    """Figure 7 in miniature: followers missing entries and with extra uncommitted ones."""
    storages = {i: boot_storage([1, 2, 3, 4, 5]) for i in range(1, 6)}
    storages[1].append([Entry(2, 2), Entry(2, 3), Entry(4, 4), Entry(4, 5)])
    storages[1].set_hard_state(HardState(term=4, commit=1))
    storages[2].append([Entry(2, 2)])  # missing entries
    storages[3].append([Entry(2, 2), Entry(2, 3), Entry(3, 4), Entry(3, 5), Entry(3, 6)])
    storages[4].append([Entry(2, 2), Entry(2, 3), Entry(4, 4)])
    for i in (2, 3, 4, 5):
        storages[i].set_hard_state(HardState(term=4, commit=1))
    c = Cluster(5, storages=storages, pre_vote=False)
    c.campaign(1)
    assert c.state(1) is L
    c.propose(1, b"z")
    c.tick(1, 2)
    want = [(e.index, e.term) for e in c.log_entries(1)]
    for i in range(2, 6):
        assert [(e.index, e.term) for e in c.log_entries(i)] == want


# ----------------------------------------------------------------------------------------------
# §5.4 safety
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cand_last", "cand_term", "granted"),
    [(3, 2, True), (2, 2, False), (4, 2, True), (1, 3, True), (5, 1, False)],
)
def test_5_4_1_vote_only_for_up_to_date_logs(cand_last: int, cand_term: int,
                                             granted: bool) -> None:
    s = boot_storage([1, 2, 3])
    s.append([Entry(2, 2), Entry(2, 3)])
    node = new_node(1, s, pre_vote=False)
    node.step(Message(MT.VOTE, to=1, from_=2, term=5, index=cand_last, log_term=cand_term))
    (resp,) = [m for m in node.ready().messages if m.type is MT.VOTE_RESP]
    assert resp.reject is not granted


def test_5_4_2_leader_commits_old_term_entries_only_with_current_term_entry() -> None:
    s = {i: boot_storage([1, 2, 3]) for i in (1, 2, 3)}
    s[1].append([Entry(2, 2, data=b"old")])  # an entry of an earlier term, uncommitted
    for st in s.values():
        st.set_hard_state(HardState(term=2, commit=1))
    c = Cluster(3, storages=s, pre_vote=False)
    c.drop_types = {MT.APP}
    c.campaign(1)
    r = c.nodes[1].raft
    assert r.state is L and r.term == 3
    # the new leader appended its empty entry of term 3 at index 3
    assert [(e.index, e.term, e.data) for e in c.log_entries(1)] == [
        (2, 2, b"old"), (3, 3, b"")]
    # a follower acknowledging only the old entry does not commit it
    c.nodes[1].step(Message(MT.APP_RESP, to=1, from_=2, term=3, index=2))
    assert r.log.committed == 1
    c.nodes[1].step(Message(MT.APP_RESP, to=1, from_=2, term=3, index=3))
    assert r.log.committed == 3


def test_leader_appends_empty_entry_on_election() -> None:
    c = elected()
    ents = c.log_entries(1)
    assert (ents[-1].term, ents[-1].data) == (2, b"")
    assert c.committed(2) == 2 and c.committed(3) == 2


# ----------------------------------------------------------------------------------------------
# PreVote and CheckQuorum
# ----------------------------------------------------------------------------------------------


def test_prevote_partitioned_node_does_not_inflate_term() -> None:
    c = elected(pre_vote=True)
    c.isolate(3)
    c.tick(3, 100)
    assert c.term(3) == 2 and c.state(3) is P
    c.heal()
    c.tick_all(5)
    assert c.leader() == 1 and c.term(1) == 2


def test_without_prevote_or_checkquorum_rejoining_node_disrupts() -> None:
    c = elected(pre_vote=False, check_quorum=False)
    c.isolate(3)
    c.tick(3, 30)
    assert c.term(3) > 2
    c.heal()
    c.tick(3, 30)
    assert c.term(1) > 2  # the old leader was forced to step down


def test_checkquorum_isolated_leader_steps_down() -> None:
    c = elected(check_quorum=True)
    c.isolate(1)
    c.tick(1, 10)  # the first check still counts what was heard before the partition
    assert c.state(1) is L
    c.tick(1, 10)
    assert c.state(1) is F


def test_checkquorum_followers_ignore_votes_within_lease() -> None:
    c = elected(check_quorum=True, pre_vote=False)
    node = c.nodes[2]
    node.step(Message(MT.VOTE, to=2, from_=3, term=9, index=99, log_term=9))
    assert node.raft.term == 2 and node.raft.vote == 1
    assert outbox(c, 2) == []


# ----------------------------------------------------------------------------------------------
# ReadIndex (ReadOnlySafe)
# ----------------------------------------------------------------------------------------------


def test_read_index_on_leader_needs_quorum_ack() -> None:
    c = elected()
    c.propose(1, b"w")
    c.isolate(1)
    c.run(lambda n: n.read_index(b"r1"), 1)
    assert c.read_states[1] == []
    c.heal()
    c.tick(1)  # heartbeat carries the pending context
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[1]] == [(3, b"r1")]


def test_read_index_forwarded_from_follower() -> None:
    c = elected()
    c.propose(1, b"w")
    c.run(lambda n: n.read_index(b"f"), 2)
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[2]] == [(3, b"f")]


def test_new_leader_serves_no_read_before_its_entry_commits() -> None:
    c = Cluster(3)
    c.drop_types = {MT.APP_RESP}
    c.campaign(1)
    assert c.state(1) is L and c.committed(1) == 1
    c.run(lambda n: n.read_index(b"early"), 1)
    c.tick(1, 2)
    assert c.read_states[1] == []
    c.heal()
    c.tick(1, 2)
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[1]] == [(2, b"early")]


def read_beats(msgs: list[Message]) -> list[bytes]:
    """The contexts of the heartbeats in ``msgs`` that carry one (read rounds)."""
    return [m.context for m in msgs if m.type is MT.HEARTBEAT and m.context]


def test_read_index_rounds_are_batched_and_never_serve_an_earlier_read_arrival() -> None:
    """§6.4: a read is served once a quorum acknowledged a heartbeat sent after it arrived.
    Requests arriving while a round is in flight (the leader's own and those followers forward)
    share the next broadcast; the one in flight never serves them."""
    c = elected()
    c.propose(1, b"w1")
    c.nodes[1].read_index(b"a")
    first = outbox(c, 1)
    assert sorted(read_beats(first)) == [b"a", b"a"]  # one heartbeat per follower
    c.propose(1, b"w2")  # commits (index 4) while round "a" is still in flight
    c.nodes[1].read_index(b"b")
    c.nodes[2].read_index(b"f")  # forwarded by a follower
    c.queue.extend(outbox(c, 2))
    c.deliver()  # ... delivers the forward, not yet round "a"
    assert c.read_states[1] == [] and c.read_states[2] == []
    assert read_beats(outbox(c, 1)) == []  # batched: no broadcast while "a" is in flight
    # Round "a" answers; the next one (carrying the newest context, "f") is then lost.
    c.filter = lambda m: not (m.type is MT.HEARTBEAT and m.context != b"a")
    c.queue.extend(first)
    c.deliver()
    c.queue.extend(outbox(c, 1))
    c.deliver()
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[1]] == [(3, b"a")]
    assert c.read_states[2] == []  # "b" and "f" wait: round "a" left before they arrived
    assert read_beats(c.dropped) == [b"f", b"f"]
    c.heal()
    c.tick(1)  # the periodic heartbeat carries the newest pending context
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[1]] == [(3, b"a"), (4, b"b")]
    assert [(rs.index, rs.request_ctx) for rs in c.read_states[2]] == [(4, b"f")]
    assert c.nodes[1].raft.read_only.pending == {}
    c.run(lambda n: n.read_index(b"c"), 1)  # nothing in flight: its own round at once
    assert c.read_states[1][-1].request_ctx == b"c"


# ----------------------------------------------------------------------------------------------
# Learners
# ----------------------------------------------------------------------------------------------


def test_learner_never_campaigns_and_receives_entries() -> None:
    c = Cluster(3, learners=[3])
    c.tick(3, 100)
    assert c.state(3) is F and c.term(3) == 1
    c.campaign(1)
    c.propose(1, b"x")
    assert c.data_applied(3) == [b"x"]


def test_learner_is_not_counted_for_commit_or_votes() -> None:
    c = Cluster(3, learners=[3], pre_vote=False)
    c.campaign(1)
    assert c.state(1) is L
    c.cut = {(1, 2), (2, 1)}
    c.propose(1, b"x")
    assert c.data_applied(3) == []  # learner got it, but learner acks do not commit
    assert c.nodes[3].raft.log.last_index() == 3 and c.committed(1) == 2
    node = c.nodes[2]
    node.campaign()
    outbox(c, 2)
    node.step(Message(MT.VOTE_RESP, to=2, from_=3, term=node.raft.term))
    assert node.raft.state is C  # a learner's vote does not count


# ----------------------------------------------------------------------------------------------
# Membership changes
# ----------------------------------------------------------------------------------------------


def _cc(kind: ConfChangeType, node_id: int) -> ConfChange:
    return ConfChange(kind, node_id)


def test_one_pending_conf_change_at_a_time() -> None:
    c = elected()
    c.cut = {(1, 2), (1, 3)}
    c.run(lambda n: n.propose_conf_change(_cc(ConfChangeType.ADD_LEARNER_NODE, 4)), 1)
    with pytest.raises(ProposalDroppedError):
        c.nodes[1].propose_conf_change(_cc(ConfChangeType.ADD_LEARNER_NODE, 5))
    c.heal()
    c.tick(1)
    assert 4 in c.nodes[1].raft.prs.learners
    c.run(lambda n: n.propose_conf_change(_cc(ConfChangeType.ADD_LEARNER_NODE, 5)), 1)
    assert 5 in c.nodes[1].raft.prs.learners


def test_add_learner_catch_up_by_snapshot_then_promote() -> None:
    c = elected()
    c.run(lambda n: n.propose_conf_change(_cc(ConfChangeType.ADD_LEARNER_NODE, 4)), 1)
    # the engine snapshots configuration changes; the new node starts empty
    s1 = c.storages[1]
    s1.create_snapshot(s1.last_index(), c.nodes[1].raft.prs.conf_state(), b"state")
    c.storages[4] = MemoryStorage()
    c.nodes[4] = new_node(4, c.storages[4])
    c.applied[4], c.read_states[4] = [], []
    c.propose(1, b"y")
    c.tick(1, 3)
    r4 = c.nodes[4].raft
    assert r4.log.snapshot().data == b"state" and r4.is_learner
    assert c.data_applied(4) == [b"y"]
    c.run(lambda n: n.propose_conf_change(_cc(ConfChangeType.ADD_NODE, 4)), 1)
    assert 4 in c.nodes[1].raft.prs.voters and not r4.is_learner


@pytest.mark.parametrize("kind", [ConfChangeType.REMOVE_NODE, ConfChangeType.ADD_LEARNER_NODE])
def test_removed_or_demoted_leader_hands_over_then_steps_down(kind: ConfChangeType) -> None:
    c = elected()
    c.run(lambda n: n.propose_conf_change(_cc(kind, 1)), 1)
    # the leader transferred leadership to an up-to-date voter instead of just leaving
    new = max((2, 3), key=lambda i: c.term(i))
    assert c.state(new) is L and c.term(new) == 3 and 1 not in c.nodes[new].raft.prs.voters
    with pytest.raises(ProposalDroppedError):
        c.nodes[1].propose(b"x")
    c.tick(1, 10)  # it hears nothing from the new configuration: steps down on its own
    assert c.state(1) is F


# ----------------------------------------------------------------------------------------------
# Leadership transfer
# ----------------------------------------------------------------------------------------------


def test_transfer_to_up_to_date_follower() -> None:
    c = elected()
    c.run(lambda n: n.transfer_leader(2), 1)
    assert c.leader() == 2 and c.state(1) is F and c.term(2) == 3


def test_transfer_catches_up_lagging_target_first() -> None:
    c = elected()
    c.cut = {(1, 3)}
    c.propose(1, b"a")
    assert c.nodes[3].raft.log.last_index() < c.nodes[1].raft.log.last_index()
    c.heal()
    sent: list[Message] = []
    c.filter = lambda m: sent.append(m) or True  # type: ignore[func-returns-value]
    c.run(lambda n: n.transfer_leader(3), 1)
    kinds = [m.type for m in sent if m.from_ == 1 and m.to == 3]
    assert kinds.index(MT.APP) < kinds.index(MT.TIMEOUT_NOW)
    assert c.leader() == 3


def test_transfer_refuses_proposals_and_aborts_after_election_timeout() -> None:
    c = elected()
    c.isolate(3)
    c.run(lambda n: n.transfer_leader(3), 1)
    assert c.nodes[1].raft.lead_transferee == 3
    with pytest.raises(ProposalDroppedError):
        c.nodes[1].propose(b"x")
    c.cut = {(1, 3), (3, 1)}  # keep 1 and 2 talking so check-quorum holds
    c.tick(1, 10)
    assert c.nodes[1].raft.lead_transferee == 0 and c.state(1) is L
    c.propose(1, b"x")
    assert b"x" in c.data_applied(1)


# ----------------------------------------------------------------------------------------------
# Snapshots
# ----------------------------------------------------------------------------------------------


def test_leader_sends_snapshot_when_next_entry_is_compacted() -> None:
    c = elected()
    c.isolate(3)
    for k in range(5):
        c.propose(1, b"%d" % k)
    s1 = c.storages[1]
    s1.create_snapshot(c.committed(1), c.nodes[1].raft.prs.conf_state(), b"snap")
    s1.compact(c.committed(1))
    c.heal()
    sent: list[Message] = []
    c.filter = lambda m: sent.append(m) or True  # type: ignore[func-returns-value]
    c.tick(1, 2)
    assert any(m.type is MT.SNAP and m.to == 3 for m in sent)
    assert c.nodes[3].raft.log.committed == c.committed(1)
    assert c.storages[3].snapshot().data == b"snap"


def test_follower_ignores_snapshot_not_newer_than_commit() -> None:
    c = elected()
    c.propose(1, b"a")
    node = c.nodes[2]
    r = node.raft
    committed = r.log.committed
    snap = Snapshot(SnapshotMetadata(r.prs.conf_state(), committed - 1, 2), b"old")
    node.step(Message(MT.SNAP, to=2, from_=1, term=2, snapshot=snap))
    assert not r.log.has_pending_snapshot()
    (resp,) = outbox(c, 2)
    assert resp.type is MT.APP_RESP and resp.index == committed


# ----------------------------------------------------------------------------------------------
# Flow control and back-off
# ----------------------------------------------------------------------------------------------


def test_inflight_window_caps_unacknowledged_appends() -> None:
    c = elected(max_inflight_msgs=2)
    leader = c.nodes[1]
    apps = []
    for k in range(6):  # one Ready per proposal, so each would be its own append
        leader.propose(b"%d" % k)
        apps += [m for m in outbox(c, 1) if m.type is MT.APP and m.to == 2]
    assert len(apps) == 2
    assert leader.raft.prs.progress[2].state is ProgressState.REPLICATE


def test_max_size_per_msg_batches_catch_up() -> None:
    c = elected(max_size_per_msg=300)
    c.isolate(3)
    for k in range(10):
        c.propose(1, b"x" * 100 + b"%d" % k)
    c.heal()
    sent: list[Message] = []
    c.filter = lambda m: sent.append(m) or True  # type: ignore[func-returns-value]
    c.tick(1, 3)
    apps = [m for m in sent if m.type is MT.APP and m.to == 3 and m.entries]
    assert len(apps) >= 4
    assert all(sum(e.size() for e in m.entries) <= 300 or len(m.entries) == 1 for m in apps)
    assert c.data_applied(3) == c.data_applied(1)


def test_fast_backoff_skips_a_whole_conflicting_term() -> None:
    s = {i: boot_storage([1, 2, 3]) for i in (1, 2, 3)}
    # node 3 has 30 uncommitted entries of term 2; the others have 3 entries of term 3
    s[3].append([Entry(2, i) for i in range(2, 32)])
    for i in (1, 2):
        s[i].append([Entry(3, i2) for i2 in range(2, 5)])
    for st in s.values():
        st.set_hard_state(HardState(term=3, commit=1))
    c = Cluster(3, storages=s, pre_vote=False)
    sent: list[Message] = []
    c.filter = lambda m: sent.append(m) or True  # type: ignore[func-returns-value]
    c.campaign(1)
    assert c.state(1) is L
    rejects = [m for m in sent if m.type is MT.APP_RESP and m.from_ == 3 and m.reject]
    assert 1 <= len(rejects) <= 2
    assert [(e.index, e.term) for e in c.log_entries(3)] == [
        (e.index, e.term) for e in c.log_entries(1)]


def test_rawnode_status_and_soft_state() -> None:
    c = elected()
    st = c.nodes[1].status()
    assert st.raft_state is L and st.lead == 1 and set(st.progress) == {1, 2, 3}
    assert isinstance(c.nodes[1], RawNode)

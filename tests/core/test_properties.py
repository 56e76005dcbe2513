"""Hypothesis property tests: the log against a model, quorum arithmetic against brute force,
encoding round-trips and fuzzing, and RawNode.step fed arbitrary messages."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.helpers import Cluster
from trio_raft.core import encoding as enc
from trio_raft.core.errors import (
    CompactedError,
    ConfChangeError,
    DecodeError,
    ProposalDroppedError,
    StepLocalMsgError,
    StepPeerNotFoundError,
    UnavailableError,
)
from trio_raft.core.log import RaftLog
from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.quorum import VoteResult, committed_index, majority, vote_result
from trio_raft.core.storage import MemoryStorage

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# The log (MemoryStorage + RaftLog) against a list-of-terms model
# ---------------------------------------------------------------------------------------------


class LogModel:
    """``terms[i - 1]`` is the term of index ``i``; indexes <= ``compacted`` are gone."""

    def __init__(self) -> None:
        self.terms: list[int] = []
        self.compacted = 0
        self.committed = 0
        self.stable = 0  # entries up to here are in storage

    def last(self) -> int:
        return len(self.terms)

    def term(self, i: int) -> int:
        return 0 if i == 0 else self.terms[i - 1]


def _check_log(log: RaftLog, model: LogModel) -> None:
    assert log.last_index() == model.last()
    assert log.first_index() == model.compacted + 1
    assert log.committed == model.committed
    for i in range(model.compacted, model.last() + 1):
        assert log.term(i) == model.term(i), i
        assert log.match_term(i, model.term(i))
    if model.compacted > 0:
        with pytest.raises(CompactedError):
            log.term(model.compacted - 1)
    with pytest.raises(UnavailableError):
        log.term(model.last() + 1)
    assert log.last_term() == model.term(model.last())
    ents = log.entries(model.compacted + 1)
    assert [e.term for e in ents] == model.terms[model.compacted :]
    assert [e.index for e in ents] == list(range(model.compacted + 1, model.last() + 1))
    # is_up_to_date is a lexicographic comparison on (last term, last index)
    lt, li = model.term(model.last()), model.last()
    for t, i in [(lt, li), (lt, li - 1), (lt + 1, 0), (max(lt - 1, 0), li + 5)]:
        assert log.is_up_to_date(i, t) == ((t, i) >= (lt, li))


@SETTINGS
@given(st.data())
def test_log_matches_model(data: st.DataObject) -> None:
    storage = MemoryStorage()
    log = RaftLog(storage)
    model = LogModel()
    for _ in range(data.draw(st.integers(1, 25), label="ops")):
        op = data.draw(st.sampled_from(["append", "persist", "commit", "compact", "conflict"]))
        if op == "append":
            after = data.draw(st.integers(model.committed, model.last()), label="after")
            k = data.draw(st.integers(1, 4), label="k")
            base = model.term(after)
            term = data.draw(st.integers(max(base, 1), max(base, 1) + 2), label="term")
            ents = [Entry(term, after + 1 + j, data=b"%d" % j) for j in range(k)]
            assert log.append(ents) == after + k
            model.terms = model.terms[:after] + [term] * k
            model.stable = min(model.stable, after)
        elif op == "persist":
            unstable = log.unstable_entries()
            if unstable:
                storage.append(unstable)
                log.stable_to(unstable[-1].index, unstable[-1].term)
                model.stable = model.last()
            assert log.unstable_entries() == []
        elif op == "commit":
            to = data.draw(st.integers(model.committed, model.last()), label="commit")
            log.commit_to(to)
            model.committed = to
        elif op == "compact":
            hi = min(model.committed, model.stable)
            if hi > model.compacted:
                to = data.draw(st.integers(model.compacted + 1, hi), label="compact")
                storage.compact(to)
                model.compacted = to
        else:
            # find_conflict against a batch that agrees up to some point and then differs
            lo = model.compacted + 1
            if model.last() >= lo:
                start = data.draw(st.integers(lo, model.last()), label="start")
                k = data.draw(st.integers(1, 4), label="k")
                bump = data.draw(st.integers(0, k), label="bump")
                batch = []
                for j in range(k):
                    idx = start + j
                    t = model.term(idx) if idx <= model.last() else model.term(model.last())
                    if j >= bump:
                        t += 1
                    batch.append(Entry(t, idx))
                want = 0
                for e in batch:
                    if e.index > model.last() or model.term(e.index) != e.term:
                        want = e.index
                        break
                assert log.find_conflict(batch) == want
        _check_log(log, model)


@SETTINGS
@given(
    terms=st.lists(st.integers(1, 4), min_size=1, max_size=30).map(sorted),
    index=st.integers(0, 35),
    term=st.integers(0, 5),
)
def test_find_conflict_by_term_is_largest_match(terms: list[int], index: int, term: int) -> None:
    storage = MemoryStorage()
    storage.append([Entry(t, i + 1) for i, t in enumerate(terms)])
    log = RaftLog(storage)
    got = log.find_conflict_by_term(index, term)
    i = min(index, len(terms)) if index <= len(terms) else index
    if index > len(terms):
        assert got == (index, 0)
        return
    while i > 0 and terms[i - 1] > term:
        i -= 1
    assert got == (i, terms[i - 1] if i else 0)


# ---------------------------------------------------------------------------------------------
# Quorum arithmetic
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(st.dictionaries(st.integers(1, 9), st.one_of(st.none(), st.integers(0, 20)),
                       max_size=7))
def test_committed_index_brute_force(acks: dict[int, int | None]) -> None:
    voters = set(acks)
    got = committed_index(voters, acks.get)
    if not voters:
        assert got == 0
        return
    q = majority(len(voters))
    best = max(
        (i for i in range(0, 21) if sum(1 for v in voters if (acks[v] or 0) >= i) >= q),
        default=0,
    )
    assert got == best


@SETTINGS
@given(
    st.sets(st.integers(1, 9), max_size=7),
    st.dictionaries(st.integers(1, 12), st.booleans(), max_size=10),
)
def test_vote_result_brute_force(voters: set[int], votes: dict[int, bool]) -> None:
    got = vote_result(voters, votes)
    if not voters:
        assert got is VoteResult.WON
        return
    q = majority(len(voters))
    yes = sum(1 for v in voters if votes.get(v) is True)
    missing = sum(1 for v in voters if v not in votes)
    # Try every way the missing votes could go.
    outcomes = {yes + extra >= q for extra in range(missing + 1)}
    if outcomes == {True}:
        assert got is VoteResult.WON
    elif outcomes == {False}:
        assert got is VoteResult.LOST
    else:
        assert got is VoteResult.PENDING


def test_majority_small() -> None:
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    for n in range(1, 8):
        # any two majorities intersect
        for a, b in itertools.product(range(majority(n), n + 1), repeat=2):
            assert a + b > n


# ---------------------------------------------------------------------------------------------
# Encoding: round trips and fuzzing
# ---------------------------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 1000)
ids = st.lists(u64, max_size=4).map(tuple)
entries = st.builds(Entry, term=u64, index=u64, type=st.sampled_from(EntryType),
                    data=st.binary(max_size=40))
conf_states = st.builds(ConfState, voters=ids, learners=ids, voters_outgoing=ids,
                        learners_next=ids, auto_leave=st.booleans())
snapshots = st.builds(
    Snapshot,
    metadata=st.builds(SnapshotMetadata, conf_state=conf_states, index=u64, term=u64),
    data=st.binary(max_size=40),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=u64, from_=u64, term=u64, log_term=u64, index=u64,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=u64,
    snapshot=st.one_of(st.none(), snapshots),
    reject=st.booleans(),
    reject_hint=u64,
    context=st.binary(max_size=20),
)


@SETTINGS
@given(messages)
def test_message_round_trip(m: Message) -> None:
    assert enc.message_from_bytes(enc.message_to_bytes(m)) == m


@SETTINGS
@given(entries, snapshots, st.builds(HardState, term=u64, vote=u64, commit=u64))
def test_value_round_trips(e: Entry, s: Snapshot, hs: HardState) -> None:
    assert enc.entry_from_bytes(enc.entry_to_bytes(e)) == e
    assert enc.snapshot_from_bytes(enc.snapshot_to_bytes(s)) == s
    assert enc.hard_state_from_bytes(enc.hard_state_to_bytes(hs)) == hs


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "extend"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    raw = bytearray(enc.message_to_bytes(draw(messages)))
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, max(len(raw) - 1, 0)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return bytes(raw)
    return bytes(raw) + draw(st.binary(min_size=1, max_size=8))


DECODERS = [enc.message_from_bytes, enc.entry_from_bytes, enc.snapshot_from_bytes,
            enc.hard_state_from_bytes, ConfChange.decode]


@settings(max_examples=400, deadline=None)
@given(mangled())
def test_decoders_only_raise_decode_error(raw: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(raw)
        except DecodeError:
            pass
        except ConfChangeError:  # what ConfChange.decode documents
            assert decode == ConfChange.decode


def test_decode_rejects_huge_declared_counts() -> None:
    m = Message(MessageType.APP, to=1, from_=2, term=3, entries=(Entry(1, 1, data=b"x"),))
    raw = bytearray(enc.message_to_bytes(m))
    # the entry count follows the fixed header and the (empty) context
    off = enc._MSG.size
    raw[off : off + 4] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(DecodeError):
        enc.message_from_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Bad input: RawNode.step fed arbitrary messages
# ---------------------------------------------------------------------------------------------

ALLOWED = (StepLocalMsgError, StepPeerNotFoundError, ProposalDroppedError)


@st.composite
def hostile_message(draw: st.DrawFn, target: int, term: int, last: int) -> Message:
    num = st.sampled_from([0, 1, 2, last - 1, last, last + 1, last + 50, 2**63, -1])
    # Half the time: from a real peer at the current term, so that only the other fields are
    # odd (that is what gets past the term checks and reaches the log).
    plausible = draw(st.booleans())
    t = term if plausible else draw(
        st.sampled_from([0, term - 1, term, term + 1, term + 7, 2**40, -3]))
    kind = draw(st.sampled_from(MessageType))
    index = draw(num)
    ents: tuple[Entry, ...] = ()
    if draw(st.booleans()):
        if draw(st.booleans()):  # well formed continuation
            n = draw(st.integers(1, 4))
            et = draw(st.sampled_from([max(t, 0), max(t - 1, 0), 1]))
            ents = tuple(Entry(et, index + 1 + j, data=b"h%d" % j) for j in range(n))
        else:
            ents = tuple(draw(st.lists(
                st.builds(Entry, term=num, index=num, type=st.sampled_from(EntryType),
                          data=st.binary(max_size=30)), max_size=3)))
    snap = None
    if kind is MessageType.SNAP or draw(st.integers(0, 9)) == 0:
        cs = draw(st.sampled_from([ConfState(voters=(1, 2, 3)), ConfState(voters=(7,)),
                                   ConfState(voters=(1, 2, 3), voters_outgoing=(1,)),
                                   ConfState()]))
        snap = Snapshot(SnapshotMetadata(cs, draw(num), draw(num)), b"")
    return Message(
        kind,
        to=target if plausible else draw(st.sampled_from([target, target, 0, 99])),
        from_=(3 if target == 1 else 1) if plausible else draw(
            st.sampled_from([1, 2, 3, 0, 99, target])),
        term=t,
        log_term=draw(num),
        index=index,
        entries=ents,
        commit=draw(num),
        snapshot=snap,
        reject=draw(st.booleans()),
        reject_hint=draw(num),
        context=draw(st.sampled_from([b"", b"ctx", b"CampaignTransfer"])),
    )


def _check_node(c: Cluster, i: int, floor: dict[int, int]) -> None:
    log = c.nodes[i].raft.log
    assert log.applied <= log.committed <= log.last_index()
    assert log.committed >= floor.get(i, 0)
    floor[i] = log.committed


@pytest.mark.parametrize("target", [1, 2])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_step_survives_hostile_messages(target: int, data: st.DataObject) -> None:
    c = Cluster(3)
    c.campaign(1)
    for k in range(3):
        c.propose(1, b"ok%d" % k)
    assert c.state(1) is StateType.LEADER
    floor: dict[int, int] = {}
    node = c.nodes[target]
    for _ in range(data.draw(st.integers(1, 12), label="n")):
        r = node.raft
        m = data.draw(hostile_message(target, r.term, r.log.last_index()), label="msg")
        with contextlib.suppress(ALLOWED):
            node.step(m)
        c.queue.extend(c.drain_node(target))
        _check_node(c, target, floor)
        if data.draw(st.booleans(), label="deliver"):
            c.deliver()
            for i in c.nodes:
                _check_node(c, i, floor)
    # The cluster keeps working: ticks, elections and proposals raise nothing unexpected.
    c.queue.clear()
    c.tick_all(40)
    for i in c.nodes:
        _check_node(c, i, floor)
    lead = c.leader()
    if lead is not None:
        with contextlib.suppress(ProposalDroppedError):
            c.propose(lead, b"after")
    for i in c.nodes:
        _check_node(c, i, floor)


def test_append_with_gap_and_high_commit_is_dropped() -> None:
    """Regression: entries not following ``index`` made commit_to raise ValueError."""
    c = Cluster(3)
    c.campaign(1)
    node = c.nodes[2]
    r = node.raft
    last = r.log.last_index()
    bogus = Message(MessageType.APP, to=2, from_=1, term=r.term, log_term=r.log.last_term(),
                    index=last, entries=(Entry(r.term, 2**63),), commit=last + 1)
    node.step(bogus)
    assert r.log.committed == last and r.log.last_index() == last
    # a well-formed append still works
    node.step(Message(MessageType.APP, to=2, from_=1, term=r.term, log_term=r.log.last_term(),
                      index=last, entries=(Entry(r.term, last + 1, data=b"x"),),
                      commit=last + 1))
    assert r.log.committed == last + 1


def test_conf_change_decode_errors() -> None:
    cc = ConfChange(ConfChangeType.ADD_NODE, 5, b"ctx", 9)
    assert ConfChange.decode(cc.encode()) == cc

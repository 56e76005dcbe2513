"""A deterministic, seeded simulator of a cluster of core RawNodes.

Everything random comes from one ``random.Random(seed)``: the network's faults, the workload, and
each node's election-timeout RNG (``Config.rng``). The same seed replays the same run, so a failing
seed is a bug report: :class:`SimulationFailure` carries the one-line command that replays it::

    python -m trio_raft.testing.simulator --seed 123 --nodes 5 --steps 2000

Model
-----
* Time advances in ticks. Each step, every running node ticks (occasionally one skips a tick:
  clock skew), then due messages are delivered in random order, then random client and fault
  events happen.
* Network: every message may be dropped, duplicated, and is delayed 0..``max_delay`` ticks (hence
  reordered). Partitions (two groups) and one-way link cuts block delivery until healed. A sender
  learns of undeliverable messages (``report_unreachable``, ``report_snapshot(ok=False)``) the way
  a transport would, and of delivered snapshots (``report_snapshot(ok=True)``).
* Disk: each node's "disk" is a MemoryStorage (entries, hard state, snapshot). Each Ready is
  handled as the engine will: install the snapshot, append entries, persist the hard state (all
  synchronously, so a Ready is durable as a whole), then send messages, apply committed entries,
  deliver read states, ``advance``. A crash discards the RawNode (its unstable entries, votes in
  progress, read requests...) and keeps the disk; a "torn" crash happens after persisting a Ready
  but before its messages leave.
* State machine: a digest chain over applied entries. It is durable only through snapshots: a
  restarted node is built with ``applied`` = its disk snapshot's index, restores the state machine
  from that snapshot's data and re-applies (including configuration changes) everything after.
  Each applied configuration change is followed by a snapshot at its index (the engine's
  config-change snapshots), so a leader always has a snapshot that includes new members; random
  log compaction snapshots the state machine at its applied index and compacts the disk.
* Membership: ids ``1..nodes`` start as voters (a bootstrap snapshot at index 1); ids above that
  are spares added as learners, promoted, removed and re-added (with their old disk, never wiped).
* Workload: proposals (single and batched), read_index requests, membership changes, leadership
  transfers, crashes/restarts, partitions and compaction. After every step the
  :class:`~trio_raft.testing.invariants.Invariants` are checked; at the end (``liveness``), the
  network is healed and every node restarted, and a leader must emerge and commit a proposal on
  every running member.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import struct
import sys

import attrs

from trio_raft.core.errors import (
    ConfChangeError,
    ProposalDroppedError,
    SnapOutOfDateError,
    StepPeerNotFoundError,
)
from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.raft import Config
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage
from trio_raft.testing.invariants import Invariants, InvariantViolation, log_term_of

__all__ = ["SimOptions", "SimulationFailure", "Simulator", "StateMachine", "main", "run"]


class SimulationFailure(AssertionError):
    """A seed broke an invariant (or the core raised); the message ends with a replay command."""


@attrs.define
class SimOptions:
    seed: int = 0
    nodes: int = 3
    steps: int = 1000
    spares: int = 2
    liveness: bool = True
    drop: float = 0.05
    duplicate: float = 0.03
    max_delay: int = 3
    skew: float = 0.05
    crash: float = 0.006
    torn_crash: float = 0.3
    restart: float = 0.08
    partition: float = 0.006
    one_way: float = 0.004
    heal: float = 0.03
    propose: float = 0.35
    read: float = 0.12
    conf_change: float = 0.015
    transfer: float = 0.008
    compact: float = 0.02
    election_tick: int = 10
    heartbeat_tick: int = 2
    max_size_per_msg: int = 2048
    max_inflight: int = 4

    def replay_command(self) -> str:
        return (
            f"python -m trio_raft.testing.simulator --seed {self.seed} --nodes {self.nodes} "
            f"--steps {self.steps}"
        )


_SM = struct.Struct(">Q16s")


class StateMachine:
    """A digest chain over applied entries: equal digests at one index mean equal histories."""

    __slots__ = ("digest", "index")

    def __init__(self, index: int = 0, digest: bytes = b"\0" * 16) -> None:
        self.index = index
        self.digest = digest

    def apply(self, ent: Entry) -> None:
        h = hashlib.blake2b(self.digest, digest_size=16)
        h.update(struct.pack(">QQB", ent.index, ent.term, ent.type))
        h.update(ent.data)
        self.digest = h.digest()
        self.index = ent.index

    def encode(self) -> bytes:
        return _SM.pack(self.index, self.digest)

    @classmethod
    def decode(cls, data: bytes) -> StateMachine:
        index, digest = _SM.unpack(data)
        return cls(index, digest)


class SimNode:
    __slots__ = ("disk", "id", "last_commit", "node", "sm", "started", "torn")

    def __init__(self, node_id: int) -> None:
        self.id = node_id
        self.disk = MemoryStorage()
        self.node: RawNode | None = None
        self.sm = StateMachine()
        self.last_commit = 0
        self.torn = False  # crash after persisting the next Ready, before sending
        self.started = False


class Simulator:
    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.inv = Invariants()
        self.now = 0
        self.seq = 0
        self.net: list[tuple[int, int, Message]] = []
        self.blocked: set[tuple[int, int]] = set()
        self.reads: dict[bytes, int] = {}
        self.reports: list[tuple[Message, bool]] = []
        self.counter = 0
        self.seen_leaders: set[tuple[int, int]] = set()
        self.stats = {"applied": 0, "reads": 0, "elections": 0, "conf_changes": 0,
                      "crashes": 0, "snapshots_installed": 0}
        r = self.rng
        self.pre_vote, self.check_quorum = r.choice([(True, True), (True, False), (False, True)])
        ids = list(range(1, opts.nodes + 1))
        self.nodes = {i: SimNode(i) for i in range(1, opts.nodes + opts.spares + 1)}
        boot = StateMachine(1)
        for i in ids:
            n = self.nodes[i]
            n.disk.apply_snapshot(
                Snapshot(SnapshotMetadata(ConfState(voters=ids), index=1, term=1), boot.encode())
            )
            n.disk.set_hard_state(HardState(term=1, commit=1))
            self.start(n)

    # -- nodes --------------------------------------------------------------------------
    def start(self, n: SimNode) -> None:
        o = self.opts
        snap = n.disk.snapshot()
        cfg = Config(
            id=n.id,
            storage=n.disk,
            rng=random.Random(self.rng.getrandbits(64)),
            election_tick=o.election_tick,
            heartbeat_tick=o.heartbeat_tick,
            applied=snap.metadata.index,
            max_size_per_msg=o.max_size_per_msg,
            max_inflight_msgs=o.max_inflight,
            check_quorum=self.check_quorum,
            pre_vote=self.pre_vote,
        )
        n.node = RawNode(cfg)
        n.started = True
        n.sm = StateMachine.decode(snap.data) if not snap.is_empty() else StateMachine()
        n.last_commit = n.node.raft.log.committed
        n.torn = False
        self.process(n)

    def crash(self, n: SimNode) -> None:
        n.node = None
        self.stats["crashes"] += 1

    def running(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.node is not None]

    def leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self.running():
            assert n.node is not None
            r = n.node.raft
            if r.state is StateType.LEADER and (
                best is None or r.term > best.node.raft.term  # type: ignore[union-attr]
            ):
                best = n
        return best

    # -- the driver (what the engine does with a Ready) ------------------------------------
    def process(self, n: SimNode) -> None:
        while n.node is not None and n.node.has_ready():
            self.handle_ready(n, n.node, n.node.ready())

    def handle_ready(self, n: SimNode, rn: RawNode, rd: Ready) -> None:
        inv = self.inv
        r = rn.raft
        if rd.soft_state is not None and rd.soft_state.raft_state is StateType.LEADER:
            self.observe_leader(n, rn)
        if rd.snapshot is not None:
            n.disk.apply_snapshot(rd.snapshot)
            n.sm = StateMachine.decode(rd.snapshot.data)
            inv.observe_restored(n.id, n.sm.index, n.sm.digest)
            self.stats["snapshots_installed"] += 1
        if rd.entries:
            prev = log_term_of(r.log)(rd.entries[0].index - 1)
            inv.observe_persisted(n.id, rd.entries, -1 if prev is None else prev, n.last_commit)
            n.disk.append(rd.entries)
        if rd.hard_state is not None:
            n.disk.set_hard_state(rd.hard_state)
        if n.torn:
            self.crash(n)
            return
        for m in rd.messages:
            self.send(m)
        for ent in rd.committed_entries:
            if ent.index != n.sm.index + 1:
                raise InvariantViolation(
                    f"node {n.id} applies index {ent.index} after {n.sm.index}"
                )
            n.sm.apply(ent)
            inv.observe_applied(n.id, ent, n.sm.digest)
            self.stats["applied"] += 1
            if ent.type is EntryType.CONF_CHANGE:
                cs = rn.apply_conf_change(ConfChange.decode(ent.data))
                self.stats["conf_changes"] += 1
                with contextlib.suppress(SnapOutOfDateError):
                    n.disk.create_snapshot(ent.index, cs, n.sm.encode())
        for rs in rd.read_states:
            required = self.reads.pop(rs.request_ctx, None)
            if required is not None:
                inv.check_read(n.id, rs.index, required)
                if rs.index > max(self.inv.max_committed, self.max_live_commit()):
                    raise InvariantViolation(
                        f"read: node {n.id} got read index {rs.index} that is not committed"
                    )
                self.stats["reads"] += 1
        rn.advance(rd)
        log = r.log
        if log.committed < n.last_commit:
            raise InvariantViolation(
                f"node {n.id} commit index went back from {n.last_commit} to {log.committed}"
            )
        n.last_commit = log.committed
        if not log.applied <= log.committed <= log.last_index():
            raise InvariantViolation(
                f"node {n.id}: applied {log.applied} committed {log.committed} "
                f"last {log.last_index()}"
            )

    def observe_leader(self, n: SimNode, rn: RawNode) -> None:
        r = rn.raft
        self.inv.observe_leader(n.id, r.term)
        if (r.term, n.id) not in self.seen_leaders:
            self.seen_leaders.add((r.term, n.id))
            self.stats["elections"] += 1
            self.inv.check_leader_completeness(n.id, r.term, log_term_of(r.log))

    def max_live_commit(self) -> int:
        return max((n.node.raft.log.committed for n in self.running()  # type: ignore[union-attr]
                    ), default=0)

    # -- network ------------------------------------------------------------------------
    def send(self, m: Message) -> None:
        o = self.opts
        r = self.rng
        if r.random() < o.drop:
            self.undeliverable(m)
            return
        copies = 2 if r.random() < o.duplicate else 1
        for _ in range(copies):
            self.seq += 1
            self.net.append((self.now + r.randint(0, o.max_delay), self.seq, m))

    def undeliverable(self, m: Message) -> None:
        # The sender hears about it later, like from a transport (never re-entrantly while it
        # is handling a Ready).
        if m.type is MessageType.SNAP or self.rng.random() < 0.3:
            self.reports.append((m, False))

    def flush_reports(self) -> None:
        while self.reports:
            reports, self.reports = self.reports, []
            for m, ok in reports:
                sender = self.nodes.get(m.from_)
                if sender is None or sender.node is None:
                    continue
                if m.type is MessageType.SNAP:
                    sender.node.report_snapshot(m.to, ok)
                else:
                    sender.node.report_unreachable(m.to)
                self.process(sender)

    def deliver_due(self) -> None:
        for _ in range(10):
            due = [x for x in self.net if x[0] <= self.now]
            if not due:
                return
            self.net = [x for x in self.net if x[0] > self.now]
            self.rng.shuffle(due)
            for _, _, m in due:
                self.deliver(m)
            self.flush_reports()

    def deliver(self, m: Message) -> None:
        dest = self.nodes.get(m.to)
        if dest is None or dest.node is None or (m.from_, m.to) in self.blocked:
            self.undeliverable(m)
            return
        with contextlib.suppress(StepPeerNotFoundError):
            dest.node.step(m)
        self.process(dest)
        if m.type is MessageType.SNAP:
            self.reports.append((m, True))

    # -- workload -----------------------------------------------------------------------
    def step(self) -> None:
        o = self.opts
        r = self.rng
        self.now += 1
        for n in self.running():
            if r.random() >= o.skew:
                n.node.tick()  # type: ignore[union-attr]
                self.process(n)
        self.deliver_due()
        if r.random() < o.propose:
            self.do_propose()
        if r.random() < o.read:
            self.do_read()
        if r.random() < o.conf_change:
            self.do_conf_change()
        if r.random() < o.transfer:
            self.do_transfer()
        if r.random() < o.compact:
            self.do_compact()
        self.do_faults()
        self.flush_reports()
        self.check_step()

    def check_step(self) -> None:
        for n in self.running():
            rn = n.node
            assert rn is not None
            if rn.raft.state is StateType.LEADER:
                self.observe_leader(n, rn)

    def pick_target(self) -> SimNode | None:
        lead = self.leader()
        live = self.running()
        if lead is not None and self.rng.random() < 0.85:
            return lead
        return self.rng.choice(live) if live else None

    def do_propose(self) -> None:
        n = self.pick_target()
        if n is None or n.node is None:
            return
        k = 1 if self.rng.random() < 0.7 else self.rng.randint(2, 8)
        ents = []
        for _ in range(k):
            self.counter += 1
            size = self.rng.choice((8, 100, 700))
            ents.append(Entry(0, 0, EntryType.NORMAL, b"w%d:" % self.counter + b"x" * size))
        try:
            n.node.propose_entries(ents)
        except ProposalDroppedError:
            return
        self.process(n)

    def do_read(self) -> None:
        n = self.pick_target()
        if n is None or n.node is None:
            return
        self.counter += 1
        ctx = b"r%d" % self.counter
        self.reads[ctx] = max(self.inv.max_committed, self.max_live_commit())
        n.node.read_index(ctx)
        self.process(n)

    def do_conf_change(self) -> None:
        lead = self.leader()
        if lead is None or lead.node is None:
            return
        r = self.rng
        prs = lead.node.raft.prs
        voters, learners = sorted(prs.voters), sorted(prs.learners)
        outsiders = [i for i in self.nodes if i not in prs.voters and i not in prs.learners]
        choices: list[tuple[ConfChangeType, int]] = []
        choices += [(ConfChangeType.ADD_LEARNER_NODE, i) for i in outsiders]
        choices += [(ConfChangeType.ADD_NODE, i) for i in learners]
        choices += [(ConfChangeType.ADD_NODE, i) for i in outsiders if r.random() < 0.2]
        if len(voters) > 2:
            choices += [(ConfChangeType.REMOVE_NODE, i) for i in voters if i != lead.id]
        if len(voters) > 2 and r.random() < 0.1:
            choices.append((ConfChangeType.REMOVE_NODE, lead.id))
        choices += [(ConfChangeType.REMOVE_NODE, i) for i in learners]
        choices += [(ConfChangeType.ADD_LEARNER_NODE, i) for i in voters if r.random() < 0.05]
        if not choices:
            return
        kind, target = r.choice(choices)
        try:
            lead.node.propose_conf_change(ConfChange(kind, target))
        except (ProposalDroppedError, ConfChangeError):
            return
        t = self.nodes[target]
        if kind is not ConfChangeType.REMOVE_NODE and t.node is None:
            self.start(t)
        self.process(lead)

    def do_transfer(self) -> None:
        lead = self.leader()
        if lead is None or lead.node is None:
            return
        voters = sorted(lead.node.raft.prs.voters)
        if not voters:
            return
        lead.node.transfer_leader(self.rng.choice(voters))
        self.process(lead)

    def do_compact(self) -> None:
        live = self.running()
        if not live:
            return
        n = self.rng.choice(live)
        rn = n.node
        assert rn is not None
        applied = n.sm.index
        disk = n.disk
        if applied > disk.snapshot().metadata.index:
            disk.create_snapshot(applied, rn.raft.prs.conf_state(), n.sm.encode())
        lo = disk.first_index()
        if applied > lo:
            disk.compact(self.rng.randint(lo, applied))

    def do_faults(self) -> None:
        o = self.opts
        r = self.rng
        ids = sorted(self.nodes)
        if r.random() < o.crash:
            live = self.running()
            if live:
                n = r.choice(live)
                if r.random() < o.torn_crash:
                    n.torn = True
                else:
                    self.crash(n)
        if r.random() < o.restart:
            down = [n for n in self.nodes.values() if n.node is None and n.started]
            if down:
                self.start(r.choice(down))
        if r.random() < o.partition:
            side = {i for i in ids if r.random() < 0.5}
            self.blocked |= {(a, b) for a in ids for b in ids if (a in side) != (b in side)}
        if r.random() < o.one_way:
            a, b = r.sample(ids, 2)
            self.blocked.add((a, b))
        if self.blocked and r.random() < o.heal:
            self.blocked.clear()

    # -- liveness -----------------------------------------------------------------------
    def heal_and_check_liveness(self) -> None:
        self.blocked.clear()
        self.opts = attrs.evolve(self.opts, drop=0.0, duplicate=0.0, crash=0.0, partition=0.0,
                                 one_way=0.0)
        for n in self.nodes.values():
            n.torn = False
            if n.node is None and n.started:
                self.start(n)
        et = self.opts.election_tick
        marker: bytes | None = None
        for _ in range(60 * et):
            self.now += 1
            for n in self.running():
                n.node.tick()  # type: ignore[union-attr]
                self.process(n)
            self.deliver_due()
            self.check_step()
            lead = self.leader()
            if lead is None or lead.node is None:
                continue
            if marker is None:
                self.counter += 1
                try:
                    lead.node.propose(b"live%d" % self.counter)
                except ProposalDroppedError:
                    continue
                marker_index = lead.node.raft.log.last_index()
                marker = b"live%d" % self.counter
                self.process(lead)
                continue
            members = lead.node.raft.prs.voters | lead.node.raft.prs.learners
            c = self.inv.committed.get(marker_index)
            if c is None or c[2] != marker:
                if c is not None:
                    marker = None  # overwritten before commit (leader changed): try again
                continue
            if all(self.nodes[i].sm.index >= marker_index for i in members):
                return
        raise InvariantViolation(
            f"liveness: no leader committed and applied a proposal everywhere within "
            f"{60 * et} ticks after healing (leader={self.leader() and self.leader().id})"  # type: ignore[union-attr]
        )

    # -- running ------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        try:
            for _ in range(self.opts.steps):
                self.step()
            if self.opts.liveness:
                self.heal_and_check_liveness()
        except Exception as exc:
            raise SimulationFailure(
                f"seed {self.opts.seed} failed at tick {self.now}: "
                f"{type(exc).__name__}: {exc}\n  replay: {self.opts.replay_command()}"
            ) from exc
        return self.stats


def run(seed: int, nodes: int = 3, steps: int = 1000, **kw: object) -> dict[str, int]:
    """Run one seed; raises :class:`SimulationFailure` (with a replay command) on a violation."""
    return Simulator(SimOptions(seed=seed, nodes=nodes, steps=steps, **kw)).run()  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the deterministic Raft core simulator.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed on")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--no-liveness", action="store_true")
    args = p.parse_args(argv)
    failures = 0
    for seed in range(args.seed, args.seed + args.seeds):
        try:
            stats = run(seed, args.nodes, args.steps, liveness=not args.no_liveness)
        except SimulationFailure as exc:
            failures += 1
            print(exc, file=sys.stderr)
            if exc.__cause__ is not None and args.seeds == 1:
                raise
            continue
        print(f"seed {seed}: ok {stats}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults on a seeded schedule.

:func:`make_schedule` turns a seed into a list of :class:`Fault` (kind, targets as node indices
or "leader", modes, hold and quiet durations); the schedule depends on the seed only. Running a
fault applies it, holds it while the clients keep going, heals it, then leaves a quiet period for
the cluster to recover. "The leader" is resolved when the fault starts.

Kinds: ``kill`` (SIGKILL + restart of a minority), ``kill-leader``, ``kill-all`` (the whole
cluster at once), ``pause`` (SIGSTOP/SIGCONT of a minority or the leader), ``partition``
(symmetric: a minority, or the leader, cut off), ``asymmetric`` (one-way cuts: a node cannot send,
or cannot receive), ``bridge`` (two halves that only reach each other through one node),
``transfer`` (leadership transfers), ``churn`` (remove a member, wipe its data dir, start it
empty with ``--join-as-learner``, add it as a learner, promote it), ``slow-disk`` (WAL write
delay through the engine's test hook), ``delay`` (latency on links), and ``combo`` (two of the
kill / pause / partition / asymmetric / slow-disk / delay kinds at once).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from tests.chaos.cluster import Cluster

KINDS = ("kill", "kill-leader", "kill-all", "pause", "partition", "asymmetric", "bridge",
         "transfer", "churn", "slow-disk", "delay", "combo")
WEIGHTS = (3, 3, 1, 2, 3, 2, 1, 2, 1, 2, 1, 3)
COMBINABLE = ("kill", "pause", "partition", "asymmetric", "slow-disk", "delay")

Heal = Callable[[], Awaitable[None]]


@attrs.frozen
class Fault:
    kind: str
    hold: float
    quiet: float
    targets: tuple[int, ...] = ()
    leader: bool = False  # target the leader instead of ``targets``
    mode: str = ""
    amount: float = 0.0
    parts: tuple[Fault, ...] = ()

    def describe(self) -> str:
        if self.kind == "combo":
            return "combo(" + " + ".join(p.describe() for p in self.parts) + ")"
        who = "leader" if self.leader else ",".join(str(t) for t in self.targets)
        extra = f" {self.mode}" if self.mode else ""
        extra += f" {self.amount:g}" if self.amount else ""
        return f"{self.kind}[{who}]{extra} hold={self.hold:.1f}s"


def _minority(rng: random.Random, n: int) -> tuple[int, ...]:
    k = rng.randint(1, (n - 1) // 2)
    return tuple(sorted(rng.sample(range(n), k)))


def _one(rng: random.Random, kind: str, n: int, scale: float) -> Fault:
    hold = rng.uniform(1.0, 4.0) * scale
    quiet = rng.uniform(0.5, 2.0) * scale
    leader = rng.random() < 0.5
    if kind == "kill":
        return Fault(kind, hold, quiet, _minority(rng, n))
    if kind == "kill-leader":
        return Fault(kind, hold, quiet, leader=True)
    if kind == "kill-all":
        return Fault(kind, rng.uniform(0.2, 1.5), quiet + 1.0, tuple(range(n)))
    if kind == "pause":
        return Fault(kind, hold, quiet, _minority(rng, n), leader=leader)
    if kind == "partition":
        return Fault(kind, hold, quiet, _minority(rng, n), leader=leader,
                     mode=rng.choice(("blackhole", "reset")))
    if kind == "asymmetric":
        return Fault(kind, hold, quiet, (rng.randrange(n),), leader=leader,
                     mode=rng.choice(("no-send", "no-receive")))
    if kind == "bridge":
        return Fault(kind, hold, quiet, tuple(rng.sample(range(n), n)),
                     mode=rng.choice(("blackhole", "reset")))
    if kind == "transfer":
        return Fault(kind, 0.0, quiet, (rng.randrange(n),), leader=rng.random() < 0.3,
                     amount=float(rng.randint(1, 3)))
    if kind == "churn":
        return Fault(kind, 0.0, quiet + 1.0, (rng.randrange(n),), leader=rng.random() < 0.25)
    if kind == "slow-disk":
        everyone = rng.random() < 0.3
        return Fault(kind, hold, quiet, tuple(range(n)) if everyone else _minority(rng, n),
                     leader=not everyone and leader, amount=rng.choice((0.02, 0.08, 0.25)))
    if kind == "delay":
        return Fault(kind, hold, quiet, _minority(rng, n), amount=rng.choice((0.01, 0.05, 0.15)))
    raise ValueError(kind)


def make_schedule(seed: int, n: int, count: int, scale: float = 1.0,
                  kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    rng = random.Random(f"schedule-{seed}-{n}")
    weights = [WEIGHTS[KINDS.index(k)] for k in kinds]
    out: list[Fault] = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind == "combo":
            a, b = rng.sample(COMBINABLE, 2)
            parts = (_one(rng, a, n, scale), _one(rng, b, n, scale))
            hold = max(p.hold for p in parts)
            out.append(Fault("combo", hold, max(p.quiet for p in parts) + 0.5, parts=parts))
        else:
            out.append(_one(rng, kind, n, scale))
    return out


class Nemesis:
    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.counts: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    async def _targets(self, fault: Fault) -> list[str]:
        names = self.cluster.names
        if fault.leader:
            leader = await self.cluster.leader()
            if leader is not None:
                return [leader]
        return [names[i % len(names)] for i in fault.targets]

    async def run(self, fault: Fault) -> None:
        self.cluster.log(f"fault {fault.describe()}")
        if fault.kind == "combo":
            heals = [await self._apply(p) for p in fault.parts]
            await trio.sleep(fault.hold)
            for heal in reversed(heals):
                await heal()
        else:
            heal = await self._apply(fault)
            await trio.sleep(fault.hold)
            await heal()
        self.cluster.log(f"healed {fault.kind}")
        await trio.sleep(fault.quiet)

    async def _apply(self, fault: Fault) -> Heal:
        c = self.cluster
        self._count(fault.kind)
        targets = await self._targets(fault)
        kind = fault.kind

        if kind in ("kill", "kill-leader", "kill-all"):
            for t in targets:
                await c.kill(t)

            async def restart() -> None:
                for t in targets:
                    await c.start(t)
            return restart

        if kind == "pause":
            for t in targets:
                c.pause(t)

            async def resume() -> None:
                for t in targets:
                    c.resume(t)
            return resume

        if kind == "partition":
            rest = [n for n in c.names if n not in targets]
            c.proxy.partition([targets, rest], fault.mode)
            c.log(f"partition {targets} | {rest} ({fault.mode})")
            return self._heal_links

        if kind == "asymmetric":
            x = targets[0]
            for other in c.names:
                if other != x:
                    if fault.mode == "no-send":
                        c.proxy.cut(x, other)
                    else:
                        c.proxy.cut(other, x)
            c.log(f"one-way cut: {x} {fault.mode}")
            return self._heal_links

        if kind == "bridge":
            order = targets
            mid = len(order) // 2
            bridge, left, right = order[mid], order[:mid], order[mid + 1:]
            for a in left:
                for b in right:
                    c.proxy.cut(a, b, fault.mode)
                    c.proxy.cut(b, a, fault.mode)
            c.log(f"bridge {left} <-> {bridge} <-> {right}")
            return self._heal_links

        if kind == "slow-disk":
            for t in targets:
                c.set_disk_delay_file(c.nodes[t], fault.amount)
            c.log(f"slow disk {targets} {fault.amount}s")

            async def fast() -> None:
                for t in targets:
                    c.set_disk_delay_file(c.nodes[t], 0.0)
            return fast

        if kind == "delay":
            for t in targets:
                for other in c.names:
                    if other != t:
                        c.proxy.set_delay(t, other, fault.amount)
                        c.proxy.set_delay(other, t, fault.amount)
            c.log(f"link delay around {targets} {fault.amount}s")
            return self._heal_links

        if kind == "transfer":
            for _ in range(int(fault.amount) or 1):
                await self._transfer(targets[0] if not fault.leader else "")
            return _noop

        if kind == "churn":
            await churn(c, targets[0])
            return _noop
        raise ValueError(kind)

    async def _heal_links(self) -> None:
        self.cluster.proxy.heal_all()

    async def _transfer(self, to: str) -> None:
        c = self.cluster
        leader = await c.leader()
        if leader is None or leader == to:
            return
        try:
            await c.admin(f"transfer to {to or 'any'}", "transfer", to, timeout=10)
            c.log(f"transfer {leader} -> {to or 'any'}")
        except Exception as exc:  # a refused/timed-out transfer is a legitimate outcome
            c.log(f"transfer {leader} -> {to or 'any'} failed: {exc!r}")


async def _noop() -> None:
    return None


async def churn(c: Cluster, victim: str, timeout: float = 90.0) -> None:
    """Remove ``victim``, wipe its data dir, start it empty as a learner, add it, promote it.

    Each step is checked against the leader's membership first, so a step whose reply was lost
    is not repeated."""
    c.log(f"churn {victim}: remove")
    while victim in await c.members():
        await c.admin(f"remove {victim}", "remove", victim, timeout=timeout,
                      retry_on=("Pending", "Mismatch", "pending"),
                      done_on=("TransportPeerUnknown",))
    # A removed node shuts itself down; if it is cut off it may never learn: kill it.
    with trio.move_on_after(15):
        await c.wait_for(f"{victim} to stop", _stopped(c, victim), 15)
    await c.kill(victim)
    c.wipe(victim)
    c.nodes[victim].joined = True
    await c.start(victim)
    c.log(f"churn {victim}: add learner")
    while victim not in await c.members():
        await c.admin(f"add-learner {victim}", "add_learner", victim, c.nodes[victim].address,
                      timeout=timeout, retry_on=("Pending", "Mismatch", "pending"))
    c.log(f"churn {victim}: promote")
    while (await c.members()).get(victim) != "voter":
        await c.admin(f"promote {victim}", "promote", victim, timeout=timeout,
                      retry_on=("NotCaughtUp", "Pending", "Mismatch", "pending"),
                      done_on=("PromoteLearnerNotLearner",))
    c.log(f"churn {victim}: done")


def _stopped(c: Cluster, name: str) -> Callable[[], Awaitable[bool]]:
    async def cond() -> bool:
        return not c.nodes[name].alive()
    return cond

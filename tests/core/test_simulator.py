"""Seeded simulations of 3- and 5-node clusters under faults (see trio_raft.testing.simulator).

Every seed runs membership changes, leadership transfers, crashes/restarts (some torn),
partitions and one-way link cuts, drops/duplicates/reordering and log compaction, checks the
safety invariants after every step, and ends with a liveness check (after healing, a leader
emerges and a proposal commits everywhere). A failure message ends with the replay command.
"""

from __future__ import annotations

import logging

import pytest

from trio_raft.testing.simulator import SimOptions, Simulator, run

CHUNK = 25
THREE = [(lo, 3) for lo in range(0, 150, CHUNK)]      # seeds 0..149, 3 nodes
FIVE = [(lo, 5) for lo in range(1000, 1100, CHUNK)]   # seeds 1000..1099, 5 nodes
STEPS = {3: 800, 5: 600}


@pytest.fixture(autouse=True)
def _quiet_core_logs() -> None:
    logging.getLogger("trio_raft.core").setLevel(logging.ERROR)


@pytest.mark.parametrize(("first", "nodes"), THREE + FIVE,
                         ids=[f"n{n}-seeds{lo}-{lo + CHUNK - 1}" for lo, n in THREE + FIVE])
def test_seeds(first: int, nodes: int) -> None:
    totals: dict[str, int] = {}
    for seed in range(first, first + CHUNK):
        stats = run(seed, nodes, STEPS[nodes])
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    # The workload really exercised what it claims to.
    assert totals["elections"] >= CHUNK
    assert totals["conf_changes"] > 0
    assert totals["reads"] > 0
    assert totals["crashes"] > 0


def test_replay_is_deterministic() -> None:
    a = Simulator(SimOptions(seed=7, nodes=5, steps=200)).run()
    b = Simulator(SimOptions(seed=7, nodes=5, steps=200)).run()
    assert a == b


def test_failure_message_names_replay_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_raft.testing import simulator as sim_mod
    from trio_raft.testing.invariants import InvariantViolation
    from trio_raft.testing.simulator import SimulationFailure

    def boom(self: object) -> None:
        raise InvariantViolation("planted")

    monkeypatch.setattr(sim_mod.Simulator, "check_step", boom)
    with pytest.raises(SimulationFailure) as info:
        run(123, 5, 50)
    assert "python -m trio_raft.testing.simulator --seed 123 --nodes 5 --steps 50" in str(
        info.value)


def test_liveness_after_long_partition() -> None:
    """Heavy faults for a while, then heal: the liveness phase must still find a leader."""
    for seed in range(5):
        opts = SimOptions(seed=5000 + seed, nodes=5, steps=300, partition=0.05, crash=0.03,
                          drop=0.2)
        Simulator(opts).run()


@pytest.mark.parametrize("seed", [30101, 30194])
def test_regression_demoted_leader_wedge(seed: int) -> None:
    """These seeds wedged the cluster when a leader that demoted itself stepped down at once
    and the remaining voter never learned the change committed (fixed: it hands over)."""
    run(seed, 3, 1500)

"""``trio_raft.tune_gc`` (trio_raft/gctune.py): the collector's thresholds and the freeze.

The freeze changes the whole process, so the tests that freeze run in a child interpreter;
the thresholds alone are set and put back in this one.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

import trio_raft
from trio_raft.gctune import OLDER_THRESHOLDS


def test_sets_the_thresholds_and_returns_the_previous_ones() -> None:
    before = gc.get_threshold()
    try:
        previous = trio_raft.tune_gc(12_345, freeze=False)
        assert previous == before
        assert gc.get_threshold() == (12_345, *OLDER_THRESHOLDS)
        assert trio_raft.tune_gc(freeze=False) == (12_345, *OLDER_THRESHOLDS)
        assert gc.get_threshold()[0] == trio_raft.GC_THRESHOLD
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "50000", None])
def test_a_threshold_that_is_not_a_positive_integer_is_refused(bad: object) -> None:
    before = gc.get_threshold()
    with pytest.raises(trio_raft.ConfigError, match="positive integer"):
        trio_raft.tune_gc(bad)  # type: ignore[arg-type]
    assert gc.get_threshold() == before  # nothing changed
    assert isinstance(trio_raft.ConfigError("x"), trio_raft.RaftError)


CHILD = """
import gc, json, trio_raft
held = [[i] for i in range(1000)]  # alive when the freeze happens
before = (gc.get_threshold(), gc.get_freeze_count())
previous = trio_raft.tune_gc(FREEZE_ARGS)
after = (gc.get_threshold(), gc.get_freeze_count())
print(json.dumps({"before": before, "previous": previous, "after": after}))
"""


def run_child(args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.replace("FREEZE_ARGS", args)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_freeze_moves_what_the_process_holds_out_of_the_collectors_reach() -> None:
    r = run_child("7_000")
    assert r["before"][1] == 0
    assert r["previous"] == r["before"][0]
    assert r["after"][0] == [7_000, *OLDER_THRESHOLDS]
    assert r["after"][1] > 1_000  # the module's objects and the lists held above


def test_without_freeze_nothing_is_frozen() -> None:
    r = run_child("7_000, freeze=False")
    assert r["after"] == [[7_000, *OLDER_THRESHOLDS], 0]

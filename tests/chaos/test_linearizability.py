"""The KV linearizability checker (trio_raft.testing.linearizability) on hand-made histories."""

from __future__ import annotations

import random
import time

from trio_raft.testing.linearizability import (
    CAS,
    DELETE,
    FAIL,
    GET,
    OK,
    PUT,
    UNKNOWN,
    Op,
    check,
    check_key_history,
)


def op(p: int, kind: str, t0: float, t1: float | None, *, status: str = OK, key: str = "k",
       value: bytes | None = None, expected: bytes | None = None, result: object = None) -> Op:
    return Op(p, kind, key, t0, t1, status, value, expected, result)


def test_sequential_and_concurrent_histories_pass() -> None:
    h = [
        op(0, PUT, 0, 1, value=b"a"),
        op(1, GET, 2, 3, result=b"a"),
        op(0, CAS, 4, 5, expected=b"a", value=b"b", result=(True, b"a")),
        op(1, CAS, 6, 7, expected=b"a", value=b"c", result=(False, b"b")),
        op(2, DELETE, 8, 9, result=True),
        op(2, DELETE, 10, 11, result=False),
        op(0, CAS, 12, 13, expected=None, value=b"d", result=True),
        op(1, GET, 14, 15, result=b"d"),
    ]
    assert check(h).ok
    # Overlapping put and get: the get may see either value.
    for seen in (b"a", b"x"):
        h = [op(0, PUT, 0, 1, value=b"a"), op(1, PUT, 2, 5, value=b"x"),
             op(2, GET, 3, 4, result=seen)]
        assert check(h).ok, seen


def test_unknown_outcomes_may_apply_late_or_never() -> None:
    # An unknown put whose value shows up long after it was invoked.
    h = [op(0, PUT, 0, None, status=UNKNOWN, value=b"u"),
         op(1, PUT, 1, 2, value=b"a"),
         op(1, GET, 3, 4, result=b"a"),
         op(1, GET, 10, 11, result=b"u")]
    assert check(h).ok
    # ... or never.
    h = [op(0, PUT, 0, None, status=UNKNOWN, value=b"u"), op(1, GET, 3, 4, result=None)]
    assert check(h).ok
    # A value may appear only after the unknown put was invoked.
    h = [op(1, GET, 0, 1, result=b"u"), op(0, PUT, 2, None, status=UNKNOWN, value=b"u")]
    assert not check(h).ok
    # A failed operation never happened.
    h = [op(0, PUT, 0, 1, status=FAIL, value=b"f"), op(1, GET, 2, 3, result=b"f")]
    assert not check(h).ok


def test_stale_read_fails_with_a_minimal_history() -> None:
    h = [op(0, PUT, 0, 1, value=b"a"), op(3, GET, 0.5, 0.6, key="other", result=None),
         op(0, PUT, 2, 3, value=b"b"),
         op(1, GET, 4, 5, result=b"b"), op(2, GET, 6, 7, result=b"a"),
         op(1, PUT, 8, 9, value=b"c")]
    r = check(h)
    assert not r.ok and [f.key for f in r.failures] == ["k"]
    minimal = r.failures[0].minimal
    # Self-contained: whatever k held before, reading b and then a with no write in between.
    assert r.failures[0].from_any_state
    assert [(o.kind, o.result) for o in minimal] == [(GET, b"b"), (GET, b"a")]
    assert "NOT linearizable" in r.explain()


def test_lost_acknowledged_write_fails() -> None:
    h = [op(0, PUT, 0, 1, value=b"a"), op(1, PUT, 2, 3, value=b"b"),
         op(2, GET, 4, 5, result=b"a")]
    assert not check(h).ok
    h = [op(0, PUT, 0, 1, value=b"a"), op(1, GET, 4, 5, result=None)]
    assert not check(h).ok


def test_two_cas_winners_fail() -> None:
    h = [op(0, PUT, 0, 1, value=b"a"),
         op(1, CAS, 2, 6, expected=b"a", value=b"b", result=True),
         op(2, CAS, 3, 5, expected=b"a", value=b"c", result=True)]
    assert not check(h).ok
    # One winner and one loser that saw the winner's value is fine.
    h[2] = op(2, CAS, 3, 5, expected=b"a", value=b"c", result=(False, b"b"))
    assert check(h).ok


def test_read_of_a_value_never_written_fails() -> None:
    h = [op(0, PUT, 0, 1, value=b"a"), op(1, GET, 2, 3, result=b"zzz")]
    assert not check(h).ok
    h = [op(1, DELETE, 0, 1, result=True)]  # deleted something that never existed
    assert not check(h).ok


def test_keys_are_checked_independently() -> None:
    h = [op(0, PUT, 0, 1, key="x", value=b"1"), op(0, PUT, 2, 3, key="y", value=b"1"),
         op(1, GET, 4, 5, key="x", result=b"1"), op(1, GET, 6, 7, key="y", result=None)]
    r = check(h)
    assert not r.ok and [f.key for f in r.failures] == ["y"] and r.keys == 2


def _simulated_history(seed: int, n_ops: int, keys: int, clients: int,
                       unknown_rate: float) -> list[Op]:
    """A linearizable history by construction: each op takes effect atomically at a random
    instant inside its interval on a real dict; some outcomes are then hidden (unknown)."""
    rng = random.Random(seed)
    store: dict[str, bytes] = {}
    now = 0.0
    # Event-driven: each client has one op in flight; its effect happens at a point in time.
    pending: list[tuple[float, float, float, int, str, str, bytes | None, bytes | None,
                        bool]] = []
    ops: list[Op] = []
    client_free = [0.0] * clients
    effects = []
    for counter in range(1, n_ops + 1):
        c = min(range(clients), key=lambda i: client_free[i])
        invoke = client_free[c] + rng.random()
        effect = invoke + rng.random() * 3
        complete = effect + rng.random() * 3
        client_free[c] = complete
        kind = rng.choice([PUT, GET, GET, CAS, DELETE])
        key = f"k{rng.randrange(keys)}"
        value = f"v{counter}".encode() if kind in (PUT, CAS) else None
        expected = None
        if kind == CAS and rng.random() < 0.8:
            expected = f"v{rng.randrange(max(1, counter - 8), counter + 1)}".encode()
        lost = rng.random() < unknown_rate
        applies = not lost or rng.random() < 0.5
        effects.append((effect, invoke, complete, c, kind, key, value, expected, lost, applies))
    effects.sort()
    del pending
    for effect, invoke, complete, c, kind, key, value, expected, lost, applies in effects:
        now = effect
        cur = store.get(key)
        result: object = None
        if applies:
            if kind == PUT:
                store[key] = value  # type: ignore[assignment]
            elif kind == GET:
                result = cur
            elif kind == DELETE:
                result = store.pop(key, None) is not None
            else:
                swapped = cur is None if expected is None else cur == expected
                if swapped:
                    store[key] = value  # type: ignore[assignment]
                result = (swapped, cur)
        status = UNKNOWN if lost else OK
        ops.append(Op(c, kind, key, invoke, None if lost else complete, status, value,
                      expected, result))
    assert now >= 0
    ops.sort(key=lambda o: o.invoke)
    return ops


def test_random_linearizable_histories_pass() -> None:
    for seed in range(30):
        h = _simulated_history(seed, 300, 3, 5, 0.05)
        r = check(h)
        assert r.ok, (seed, r.explain())


def test_corrupted_random_histories_fail() -> None:
    failed = 0
    for seed in range(30):
        h = _simulated_history(seed, 200, 2, 4, 0.0)
        rng = random.Random(seed)
        # Turn one successful read of a value into a read of an older, overwritten value.
        reads = [i for i, o in enumerate(h) if o.kind == GET and o.result is not None]
        i = rng.choice(reads)
        bad = h[i]
        h[i] = Op(bad.process, GET, bad.key, bad.invoke, bad.complete, OK,
                  result=b"never-written")
        failed += not check(h).ok
    assert failed == 30


def test_a_few_thousand_operations_check_fast() -> None:
    h = _simulated_history(7, 4000, 8, 10, 0.03)
    t0 = time.perf_counter()
    r = check(h)
    elapsed = time.perf_counter() - t0
    assert r.ok, r.explain()
    assert elapsed < 2.0, elapsed
    # Many concurrent unknown writes and deletes on one key stay cheap (subset pruning).
    h = []
    for i in range(40):
        h.append(op(i, DELETE if i % 2 else PUT, i, None, status=UNKNOWN,
                    value=f"u{i}".encode()))
    for i in range(200):
        h.append(op(100, GET, 100 + 2 * i, 101 + 2 * i, result=None))
    h.append(op(101, GET, 1000, 1001, result=b"u38"))
    h.append(op(101, GET, 1002, 1003, result=b"x"))  # never written: fails
    t0 = time.perf_counter()
    assert not check_key_history(h)
    assert time.perf_counter() - t0 < 2.0

"""A linearizability checker for key/value histories (put, get, cas, delete).

A history is a list of :class:`Op`: one client operation each, with the instants it was invoked
and completed and what the client learned:

* ``ok``: it completed and the client saw its result;
* ``fail``: it certainly did not take effect (the server refused it before it reached the log);
* ``unknown``: the client does not know (a timeout, a lost connection, leadership lost while
  waiting). Such an operation may have taken effect at any instant after its invocation, or
  never.

Theory of operation
-------------------
Every operation touches one key, and linearizability is local (a history is linearizable iff
each per-object sub-history is), so the history is split by key and each key is checked alone
against a register model whose state is ``bytes`` or ``None`` (absent).

Per key, the search is the Wing & Gong algorithm with Lowe's memoization: the events (calls and
returns) form a doubly linked list in time order; the search walks it, and at a call it tries to
linearize that operation now (the model must accept its result); linearizing *lifts* the call
and its return out of the list and restarts from the head. Reaching a return whose operation is
not linearized yet means the current prefix is wrong: undo the last choice and try the next
candidate. The search succeeds when no return is left in the list. At each point the candidates
with a known outcome are tried before the optional ones (below), so that configurations with
fewer optional operations applied are explored, and cached, first.

Unknown operations have a call but no return: nothing forces them, so they may be linearized at
any point after their call, or left out. Failed operations and unknown reads are dropped up
front (they constrain nothing).

Memoization: a configuration is (set of linearized operations, model state). Lowe caches every
configuration visited; since unknown operations are optional, a configuration is also covered by
an earlier one with the same linearized *ok* operations and state and a *subset* of its unknown
operations (everything still possible from the later one was possible from the earlier one, as
unknown operations impose no real-time constraint). The cache keeps, per (ok set, state), the
unknown sets seen, and prunes on that subset relation. Two choices are never tried because a
linearization without them always exists: applying an unknown operation that leaves the state
unchanged, and applying an unknown blind write (put, delete) right after another unknown
operation (the earlier one could just as well never have happened). Whether the last
operation applied was unknown is part of the cached configuration, since it restricts what may
follow.

Symmetry: a written value that no operation ever observes (as a read result, a cas's current or
expected value) is replaced by one shared stand-in, as all such values behave alike; and at one
configuration only one of several optional operations with the same effect is tried (they were
all invoked already, so they are interchangeable). Without these two reductions, histories with
many timed-out writes blow the search up.

On failure :func:`check` returns the failing key and a small sub-history of it (see
:func:`minimize`): preferably a window of the history that fails whatever the key held before
it, shrunk one operation at a time while it still fails, so that no single operation can be
removed from the reported history.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
PUT, GET, CAS, DELETE = "put", "get", "cas", "delete"
_KINDS = (PUT, GET, CAS, DELETE)
_INF = float("inf")


@attrs.frozen
class Op:
    """One client operation.

    ``value``: the value written by put and cas. ``expected``: cas's expected value, ``None`` for
    "expect absent". ``result`` (only meaningful when ``status == "ok"``): get -> the value read
    or ``None``; delete -> whether a value was deleted; cas -> whether it swapped, or a pair
    ``(swapped, current)`` with the value found (``None`` when absent); put -> ignored.
    ``complete`` is ``None`` (or ignored) unless the status is ``ok``.
    """

    process: int
    kind: str = attrs.field(validator=attrs.validators.in_(_KINDS))
    key: str
    invoke: float
    complete: float | None = None
    status: str = attrs.field(default=OK, validator=attrs.validators.in_((OK, FAIL, UNKNOWN)))
    value: bytes | None = None
    expected: bytes | None = None
    result: Any = None

    def describe(self) -> str:
        if self.kind == PUT:
            call = f"put({self.value!r})"
        elif self.kind == GET:
            call = "get()"
        elif self.kind == DELETE:
            call = "delete()"
        else:
            exp = "<absent>" if self.expected is None else repr(self.expected)
            call = f"cas({exp} -> {self.value!r})"
        out = "" if self.status != OK or self.kind == PUT else f" = {self.result!r}"
        end = "..." if self.complete is None or self.status != OK else f"{self.complete:.6f}"
        return (f"p{self.process} [{self.invoke:.6f}, {end}] {self.key!r} {call}"
                f" {self.status}{out}")


State = bytes | None


def step(state: State, op: Op) -> tuple[bool, State]:
    """The register model: (whether ``op`` with its recorded result is legal, next state).

    For an unknown operation the result is not checked (any result would do). From
    :data:`ANY` (an unknown initial state, used to cut a failing window out of a history) the
    first operation that observes the state fixes it; an unknown cas leaves it unknown."""
    known = op.status == OK
    if state is ANY:
        return _step_from_any(op)
    if op.kind == PUT:
        return True, op.value
    if op.kind == GET:
        return (not known or op.result == state), state
    if op.kind == DELETE:
        if known and bool(op.result) != (state is not None):
            return False, state
        return True, None
    # cas
    swapped = state is None if op.expected is None else (state is not None and
                                                         state == op.expected)
    if known:
        res = op.result
        if isinstance(res, tuple):
            want_swapped, current = res
            if bool(want_swapped) != swapped:
                return False, state
            if not swapped and current != state:
                return False, state
        elif bool(res) != swapped:
            return False, state
    return True, (op.value if swapped else state)


class _Any(bytes):
    """The type of :data:`ANY`."""


#: An unknown state: every operation's first observation of it is accepted.
ANY: State = _Any(b"<any state>")


def _step_from_any(op: Op) -> tuple[bool, State]:
    known = op.status == OK
    if op.kind == PUT:
        return True, op.value
    if op.kind == DELETE:
        return True, None
    if op.kind == GET:
        return True, (op.result if known else ANY)
    if not known:
        return True, ANY
    res = op.result
    if isinstance(res, tuple):
        swapped, current = res
        if swapped:
            ok = current is None if op.expected is None else current == op.expected
            return ok, op.value
        ok = current is not None if op.expected is None else current != op.expected
        return ok, current
    return True, (op.value if res else ANY)


@attrs.frozen
class KeyResult:
    key: str
    ok: bool
    ops: int
    #: A minimal failing sub-history (empty when ``ok``).
    minimal: tuple[Op, ...] = ()
    #: Whether ``minimal`` fails from any initial state (a window cut out of the history);
    #: otherwise it fails from the empty store.
    from_any_state: bool = False


@attrs.frozen
class Result:
    ok: bool
    keys: int
    ops: int
    seconds: float
    failures: tuple[KeyResult, ...] = ()

    def explain(self) -> str:
        if self.ok:
            return f"linearizable: {self.ops} operations over {self.keys} keys"
        lines = [f"NOT linearizable: {len(self.failures)} of {self.keys} keys fail"]
        for f in self.failures:
            start = "from any initial value" if f.from_any_state else "from an absent key"
            lines.append(f"key {f.key!r}: minimal failing history ({len(f.minimal)} ops, "
                         f"fails {start}):")
            lines.extend("  " + op.describe() for op in f.minimal)
        return "\n".join(lines)


def _relevant(ops: Iterable[Op]) -> list[Op]:
    """Drop what constrains nothing: failed operations and reads whose outcome is unknown."""
    return [op for op in ops
            if op.status != FAIL and not (op.status == UNKNOWN and op.kind == GET)]


def check_key_history(ops: Sequence[Op], initial: State = None) -> bool:
    """Whether one key's history is linearizable (starting from ``initial``)."""
    return _search(ops, initial)[0]


def _search(ops: Sequence[Op], initial: State) -> tuple[bool, float]:
    """(linearizable, the instant of the return the deepest attempt could not get past)."""
    ops = _canonical(_relevant(ops), initial)
    n = len(ops)
    if n == 0:
        return True, _INF
    # Events: (time, 0 = call / 1 = return, op index). Calls sort before returns at equal
    # instants, i.e. touching intervals count as concurrent (the permissive reading).
    events: list[tuple[float, int, int]] = []
    unknown = [False] * n
    for i, op in enumerate(ops):
        events.append((op.invoke, 0, i))
        if op.status == OK:
            end = op.complete if op.complete is not None else _INF
            events.append((max(end, op.invoke), 1, i))
        else:
            unknown[i] = True
    events.sort()
    m = len(events)
    # Doubly linked list over event slots 1..m; slot 0 is the head sentinel.
    nxt = list(range(1, m + 2))
    prv = list(range(-1, m))
    ev_op = [0] * (m + 1)
    ev_is_call = [False] * (m + 1)
    ev_time = [0.0] * (m + 1)
    call_slot = [0] * n
    ret_slot = [0] * n  # 0: no return (unknown outcome)
    for s, (t, kind, i) in enumerate(events, start=1):
        ev_op[s] = i
        ev_time[s] = t
        ev_is_call[s] = kind == 0
        if kind == 0:
            call_slot[i] = s
        else:
            ret_slot[i] = s
    end = m + 1

    def unlink(s: int) -> None:
        nxt[prv[s]] = nxt[s]
        if nxt[s] != end:
            prv[nxt[s]] = prv[s]

    def relink(s: int) -> None:
        nxt[prv[s]] = s
        if nxt[s] != end:
            prv[nxt[s]] = s

    returns_left = total_returns = sum(1 for u in unknown if not u)
    deepest, stuck_at = -1, _INF
    blind = [op.kind in (PUT, DELETE) for op in ops]
    # Optional operations with the same effect are interchangeable (all candidates at one
    # configuration were invoked already): at each configuration try one of each kind.
    effect = [(op.kind, op.value, op.expected) for op in ops]
    tried: list[set[tuple[str, Any, Any]]] = [set()]
    ok_set = 0
    unk_set = 0
    in_run = False  # the last operation linearized had an unknown outcome
    state: State = initial
    cache: dict[tuple[int, State, bool], list[int]] = defaultdict(list)
    cache[(0, initial, False)].append(0)
    # (call slot, state before, in_run before, phase it was chosen in)
    stack: list[tuple[int, State, bool, int]] = []
    slot = nxt[0]
    phase = 0  # 0: trying operations with a known outcome, 1: optional (unknown) ones
    while True:
        if returns_left == 0:
            return True, _INF
        if slot != end and ev_is_call[slot]:
            i = ev_op[slot]
            if unknown[i] != (phase == 1):
                slot = nxt[slot]
                continue
            if phase == 1:
                seen_here = tried[len(stack)]
                if effect[i] in seen_here:
                    slot = nxt[slot]
                    continue
                seen_here.add(effect[i])
            legal, new_state = step(state, ops[i])
            if legal and unknown[i] and (new_state == state or (in_run and blind[i])):
                # Dominated choices: an optional operation that changes nothing, or a blind
                # write right after another optional operation (which it would overwrite).
                legal = False
            if legal:
                bit = 1 << i
                n_ok, n_unk = (ok_set, unk_set | bit) if unknown[i] else (ok_set | bit, unk_set)
                seen = cache[(n_ok, new_state, unknown[i])]
                if not any(u & ~n_unk == 0 for u in seen):
                    seen.append(n_unk)
                    stack.append((slot, state, in_run, phase))
                    state, ok_set, unk_set, in_run = new_state, n_ok, n_unk, unknown[i]
                    unlink(slot)
                    if not unknown[i]:
                        unlink(ret_slot[i])
                        returns_left -= 1
                    slot, phase = nxt[0], 0
                    continue
            slot = nxt[slot]
            continue
        # A return of an operation not linearized yet, or the end of the list.
        if phase == 0:
            # No operation with a known outcome fits here: try the optional ones.
            slot, phase = nxt[0], 1
            depth = len(stack)
            while len(tried) <= depth:
                tried.append(set())
            tried[depth] = set()
            continue
        # Nothing fits: undo the last choice and try the next candidate after it.
        if total_returns - returns_left > deepest:
            deepest = total_returns - returns_left
            stuck_at = ev_time[slot] if slot != end else _INF
        if not stack:
            return False, stuck_at
        slot, state, in_run, phase = stack.pop()
        i = ev_op[slot]
        if unknown[i]:
            unk_set &= ~(1 << i)
        else:
            ok_set &= ~(1 << i)
            relink(ret_slot[i])
            returns_left += 1
        relink(slot)
        slot = nxt[slot]


class _Unobserved(bytes):
    """The canonical stand-in for every value no operation ever compares against."""


_UNOBSERVED = _Unobserved(b"<a value nobody observed>")


def _canonical(ops: list[Op], initial: State) -> list[Op]:
    """Replace every written value that no operation observes (as a read result, a cas's
    current value or a cas's expected value) by one stand-in: such values only ever compare
    unequal to what the history looks at, so states holding them are equivalent, and sharing
    one stand-in lets the cache and the per-configuration dedup of optional operations see
    that."""
    used: set[Any] = {initial}
    for op in ops:
        if op.kind == CAS:
            used.add(op.expected)
        if op.status != OK:
            continue
        if op.kind == GET:
            used.add(op.result)
        elif op.kind == CAS and isinstance(op.result, tuple):
            used.add(op.result[1])
    out = []
    for op in ops:
        if op.kind in (PUT, CAS) and op.value not in used:
            op = attrs.evolve(op, value=_UNOBSERVED)
        out.append(op)
    return out


def _observations_explained(ops: Sequence[Op]) -> bool:
    """Whether every value a successful operation observed was written in ``ops``."""
    written = {op.value for op in ops if op.kind in (PUT, CAS)}
    for op in ops:
        if op.status != OK:
            continue
        seen: list[Any] = []
        if op.kind == GET:
            seen = [op.result]
        elif op.kind == CAS and isinstance(op.result, tuple):
            seen = [op.result[1]]
        elif op.kind == DELETE and op.result and not written:
            return False
        if any(v is not None and v not in written for v in seen):
            return False
    return True


def minimize(ops: Sequence[Op], initial: State = None, budget: float = 5.0,
             stuck: float | None = None) -> tuple[list[Op], bool]:
    """A small failing sub-history of ``ops`` (which must fail), and whether it fails from any
    initial state.

    1. Cut the history after the return the deepest attempt could not get past (``stuck``,
       as found by the failed search; computed again when not given).
    2. Look for a window at the end of that prefix that fails from *any* initial state (grow it
       backwards by doubling, then bisect its start): such a window is a self-contained
       witness. Failing that (e.g. a read of a value never written), keep the whole prefix,
       from the empty store.
    3. Drop single operations while it still fails (within ``budget`` seconds), so that, when
       time allows, no operation can be removed from the result.
    """
    deadline = time.monotonic() + budget
    cur = sorted(_relevant(ops), key=lambda o: o.invoke)
    full = cur
    if stuck is None:
        stuck = _search(cur, initial)[1]
    if stuck != _INF:
        cur = [o for o in cur if o.invoke <= stuck]
    n = len(cur)
    start: State = initial
    size, passing = 1, 0
    while size < 2 * n and time.monotonic() < deadline:
        lo = max(0, n - size)
        if not check_key_history(cur[lo:], ANY):
            hi_lo = n - passing if passing else n
            # cur[lo:] fails; cur[n - passing:] passes. Bisect for the latest failing start.
            fail_lo, pass_lo = lo, hi_lo
            while pass_lo - fail_lo > 1 and time.monotonic() < deadline:
                mid = (fail_lo + pass_lo) // 2
                if check_key_history(cur[mid:], ANY):
                    pass_lo = mid
                else:
                    fail_lo = mid
            cur, start = cur[fail_lo:], ANY
            break
        passing = size
        size *= 2
    else:
        cur = full  # no self-contained window found: the whole history, from the start
    keep_sources = start is not ANY and _observations_explained(cur)
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        for i in range(len(cur) - 1, -1, -1):
            if time.monotonic() >= deadline:
                break
            trial = cur[:i] + cur[i + 1:]
            if keep_sources and not _observations_explained(trial):
                continue
            if not check_key_history(trial, start):
                cur = trial
                changed = True
    return cur, start is ANY


def check(ops: Iterable[Op], *, minimize_budget: float = 5.0) -> Result:
    """Check a whole history (every key starts absent)."""
    t0 = time.perf_counter()
    by_key: dict[str, list[Op]] = defaultdict(list)
    count = 0
    for op in ops:
        by_key[op.key].append(op)
        count += 1
    failures: list[KeyResult] = []
    for key in sorted(by_key):
        kops = by_key[key]
        ok, stuck = _search(kops, None)
        if not ok:
            minimal, from_any = minimize(kops, budget=minimize_budget, stuck=stuck)
            failures.append(KeyResult(key, False, len(kops), tuple(minimal), from_any))
    return Result(not failures, len(by_key), count, time.perf_counter() - t0, tuple(failures))

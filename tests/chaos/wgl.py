"""Linearizability search: Wing & Gong's algorithm with Lowe's cache (as in Porcupine).

Design.  The history's call and return events are laid out in one time-ordered doubly linked
list.  The search walks it: at a call it tries to linearize that operation now (the model must
produce the recorded output), lifts the call and its return out of the list and starts again
from the head; at a return whose call was not linearized yet it backtracks — pops the last
linearized operation, undoes it in the model, puts its events back and tries the next
candidate.  The history is linearizable iff the list empties.  A cache of (set of linearized
operations, model state) prunes every path that reaches a configuration seen before (Lowe 2017,
"Testing for linearizability"), which is what keeps the search polynomial in practice.

Operations whose outcome is unknown (the client gave up) have their return at +infinity and
accept any output: they may take effect at any point after their call, or — placed after every
completed operation — in effect not at all.

For a failure the search remembers its deepest point: the longest linearizable prefix, the
completed operation that could not be placed after it, and the model state there.  `checkers`
turns that into a report.

Bounded: `max_steps` caps the work; past it the answer is "unknown", never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class SearchOp:
    """One operation of a sub-history.  For an unknown outcome `known` is False (any output is
    accepted) and `ret` is None (+infinity) unless the caller can bound when it took effect."""

    f: str
    value: dict
    call: float
    ret: float | None
    output: Any = None
    ref: Any = None  # whatever the caller uses to find the op again (history index)
    known: bool = True


@dataclass
class SearchResult:
    ok: bool | None  # None: the step budget ran out
    steps: int
    # Deepest point reached (for a report when ok is False):
    prefix: list[int] = field(default_factory=list)  # op positions, in linearization order
    blocked: int | None = None  # op that could not be linearized after `prefix`
    state: Any = None  # model.read(...) of every account at that point
    candidates: list[tuple[int, Any]] = field(default_factory=list)  # (op, model's output there)


def check(ops: list[SearchOp], make_model: Callable[[], Any], *, max_steps: int = 2_000_000,
          state_of: Callable[[Any], Any] | None = None) -> SearchResult:
    """Is the sequence of `ops` linearizable with respect to the model?  Deterministic; CPU only.

    `make_model()` returns a fresh model with `step(op_dict) -> (output, undo)`,
    `undo(undo)` and `fingerprint()`.  `state_of(model)` (optional) describes the model state for
    a report."""
    n = len(ops)
    if n == 0:
        return SearchResult(True, 0)
    events = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        events.append((math.inf if op.ret is None else op.ret, 1, i))
    events.sort()
    m = len(events)
    head = m
    nxt = list(range(1, m + 1)) + [0]
    nxt[m - 1] = -1
    nxt[head] = 0
    prv = [i - 1 for i in range(m)] + [-1]
    prv[0] = head
    call_entry = [0] * n
    ret_entry = [0] * n
    is_call = [False] * m
    op_of = [0] * m
    for k, (_, kind, i) in enumerate(events):
        op_of[k] = i
        if kind == 0:
            call_entry[i] = k
            is_call[k] = True
        else:
            ret_entry[i] = k

    def remove(x: int) -> None:
        nxt[prv[x]] = nxt[x]
        if nxt[x] != -1:
            prv[nxt[x]] = prv[x]

    def insert(x: int) -> None:
        nxt[prv[x]] = x
        if nxt[x] != -1:
            prv[nxt[x]] = x

    model = make_model()
    op_dicts = [{"f": op.f, "value": op.value} for op in ops]
    cache: set = set()
    calls: list[tuple[int, list]] = []
    linearized = 0
    steps = 0
    best = SearchResult(False, 0)
    best_depth = -1
    entry = nxt[head]
    while nxt[head] != -1:
        steps += 1
        if steps > max_steps:
            best.ok, best.steps = None, steps
            return best
        if is_call[entry]:
            i = op_of[entry]
            out, undo = model.step(op_dicts[i])
            op = ops[i]
            if not op.known or out == op.output:
                new = linearized | (1 << i)
                key = (new, model.fingerprint())
                if key not in cache:
                    cache.add(key)
                    calls.append((i, undo))
                    linearized = new
                    remove(call_entry[i])
                    remove(ret_entry[i])
                    entry = nxt[head]
                    continue
            model.undo(undo)
            entry = nxt[entry]
        else:
            if len(calls) > best_depth:
                best_depth = len(calls)
                best.prefix = [c for c, _ in calls]
                best.blocked = op_of[entry]
                best.state = state_of(model) if state_of else None
                best.candidates = _candidates(model, ops, op_dicts, nxt, head, is_call, op_of,
                                              entry)
            if not calls:
                best.steps = steps
                return best
            i, undo = calls.pop()
            linearized &= ~(1 << i)
            model.undo(undo)
            insert(ret_entry[i])
            insert(call_entry[i])
            entry = nxt[call_entry[i]]
    return SearchResult(True, steps)


def _candidates(model, ops, op_dicts, nxt, head, is_call, op_of, stop) -> list[tuple[int, Any]]:
    """The operations that could have gone next at the deepest point (calls before `stop`),
    with what the model says each would return there."""
    picks = []
    k = nxt[head]
    while k != -1 and k != stop and len(picks) < 12:
        if is_call[k]:
            picks.append(op_of[k])
        k = nxt[k]
    if op_of[stop] not in picks:
        picks.append(op_of[stop])
    out = []
    for i in picks:
        result, undo = model.step(op_dicts[i])
        model.undo(undo)
        out.append((i, result))
    return out

"""One ordered log out of every node's log.

Design: each node writes its own structured event log, one JSON object per line stamped with
the node's hybrid logical clock (`hlc`, see clock.py).  HLC order is consistent with causality:
a message's send is stamped below its receive on whatever node, so sorting all nodes' lines by
(hlc, node, line number) gives a log a person can read top to bottom as one story.  A node's
own file is already in HLC order (`EventLog` stamps and writes under one lock), so the merge is
a heap-based k-way merge that holds one line per source: files of any size stream through.

Not every source is that tidy.  Lines without `hlc` (plain text, or JSON with only a wall-clock
`ts` in float seconds) can be out of order within their file: several threads, buffering.
Those lines pass through a bounded reorder window (`window_ms`): each source holds them in a
small heap and releases one once the newest time seen in that source is more than the window
past it.  A line that turns up behind what its source already released (later than the window,
or an `hlc` line out of its file's order) is passed on at once, counted as late, and a warning
line at the end of the merge says how many there were.  A line with no time at all (a traceback
continuation, say) keeps the time of the line before it in its file, so it stays right after it.

HLC milliseconds and `ts` milliseconds are both wall-clock milliseconds, so the two kinds sort
together sensibly; the order between them is only as good as the wall clocks.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
from typing import IO, Iterable, Iterator, Union

from raftpay.clock import HLC, unpack

Source = Union[str, "os.PathLike[str]", Iterable[str]]

# The sort key of a line: (ms, counter, node, source index, line number).  `ms` is a float for
# `ts` lines (sub-millisecond precision kept) and an int for `hlc` lines; Python compares both.
Key = tuple


class LogMerge:
    """Iterate over the merged lines of several sources; `late` counts out-of-order lines.

    Sources are paths (opened lazily, UTF-8, undecodable bytes replaced, closed at the end) or
    iterables of text lines (file objects, lists, generators).  Every yielded line ends in
    exactly one "\\n".  Memory: one line per source plus each source's reorder window.
    Single-use, single-thread; deterministic for given inputs.
    """

    def __init__(self, sources: Iterable[Source], window_ms: float = 1000.0) -> None:
        if window_ms < 0:
            raise ValueError("window_ms must be >= 0")
        self.sources = list(sources)
        self.window_ms = window_ms
        self.late = 0
        self.late_by_source: dict[str, int] = {}
        self._used = False

    def __iter__(self) -> Iterator[str]:
        if self._used:
            raise RuntimeError("a LogMerge can be iterated once")
        self._used = True
        return self._merge()

    def _merge(self) -> Iterator[str]:
        streams = [self._ordered(i, src) for i, src in enumerate(self.sources)]
        try:
            # heapq.merge keeps one pending item per stream: the k-way merge.  Keys are unique
            # (they contain the source index and line number), so lines are never compared.
            for _key, line in heapq.merge(*streams):
                yield line
        finally:
            for s in streams:
                s.close()  # runs each generator's `finally`, closing files opened by path
        if self.late:
            yield json.dumps(
                {
                    "node": "logmerge",
                    "event": "logmerge.late_lines",
                    "level": "warning",
                    "count": self.late,
                    "window_ms": self.window_ms,
                    "sources": self.late_by_source,
                    "message": f"{self.late} line(s) arrived later than the reorder window "
                    "and are out of order above",
                }
            ) + "\n"

    def _ordered(self, index: int, src: Source) -> Iterator[tuple[Key, str]]:
        """One source's lines as (key, line), in key order except the counted late lines."""
        if isinstance(src, (str, os.PathLike)):
            name = os.fspath(src)
            f: IO[str] | None = open(name, encoding="utf-8", errors="replace")
            lines: Iterable[str] = f
        else:
            name = getattr(src, "name", None) or f"<source {index}>"
            f, lines = None, src
        name = str(name)
        held: list[tuple[Key, str]] = []  # the reorder window
        newest_ms = float("-inf")  # newest time seen in this source
        hlc_mark: Key | None = None  # highest hlc key seen: hlc lines are trusted in order
        last_out: Key | None = None
        prev_time: tuple = (float("-inf"), 0, "")  # (ms, counter, node) of the previous line
        window = self.window_ms
        try:
            for lineno, raw in enumerate(lines):
                line = raw.rstrip("\r\n") + "\n"
                ms, counter, node, is_hlc = _time_of(line, prev_time)
                prev_time = (ms, counter, node)
                key = (ms, counter, node, index, lineno)
                if last_out is not None and key < last_out:
                    # Behind what this source already released: too late to reorder.
                    self.late += 1
                    self.late_by_source[name] = self.late_by_source.get(name, 0) + 1
                    yield key, line
                    continue
                heapq.heappush(held, (key, line))
                if ms > newest_ms:
                    newest_ms = ms
                if is_hlc and (hlc_mark is None or key > hlc_mark):
                    hlc_mark = key
                while held:
                    k = held[0][0]
                    if (hlc_mark is not None and k <= hlc_mark) or newest_ms - k[0] > window:
                        last_out = k
                        yield heapq.heappop(held)
                    else:
                        break
            while held:
                yield heapq.heappop(held)
        finally:
            if f is not None:
                f.close()


def _time_of(line: str, prev: tuple) -> tuple[float, int, str, bool]:
    """(ms, counter, node, is_hlc) of a line; `prev` for lines that carry no time."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            node = obj.get("node")
            node = prev[2] if node is None else str(node)
            hlc = obj.get("hlc")
            if isinstance(hlc, int) and not isinstance(hlc, bool) and hlc >= 0:
                ms, c = unpack(hlc)
                return ms, c, node, True
            ts = obj.get("ts")
            if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                return ts * 1000.0, 0, node, False
            return prev[0], prev[1], node, False
    return prev[0], prev[1], prev[2], False


def merge(sources: Iterable[Source], window_ms: float = 1000.0) -> Iterator[str]:
    """Merge log sources into one ordered stream of lines; see `LogMerge`.

    Lazy: nothing is read until the first line is asked for, and whole files are never held."""
    return iter(LogMerge(sources, window_ms))


class EventLog:
    """Appends structured events, one JSON object per line, stamped with `hlc.now()`.

    `write()` stamps and writes under one lock, so the file's lines are in HLC order, which
    `merge()` relies on.  Each line is flushed to the OS (not fsynced: a log, not a ledger).
    Thread-safe.  Values that JSON cannot encode are written as `str(value)`.
    """

    RESERVED = frozenset({"hlc", "node", "event"})

    def __init__(self, path: str | os.PathLike[str], hlc: HLC, node_id: str) -> None:
        self.path = os.fspath(path)
        self.hlc = hlc
        self.node_id = node_id
        self._lock = threading.Lock()
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: object) -> int:
        """Append one event; returns its HLC stamp.  Blocks for the write."""
        clash = self.RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"reserved field name(s): {sorted(clash)}")
        with self._lock:
            ts = self.hlc.now()
            line = json.dumps(
                {"hlc": ts, "node": self.node_id, "event": event, **fields},
                default=str,
                separators=(",", ":"),
            )
            self._f.write(line + "\n")
            self._f.flush()
            return ts

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

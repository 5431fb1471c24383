"""Latency histograms and throughput timelines for the benchmark harness.

Design.  `Histogram` is HDR-style log-linear (Gil Tene's HdrHistogram, without the dependency):
values are integers in microseconds; below 128 µs every value has its own bucket, above that
each power of two is split into 64 equal buckets, so any reported percentile is within 1/128 of
the true value (the bucket's midpoint is reported, clamped to the exact min and max).  Buckets
are kept sparse in a dict so a histogram is small, merges by adding counts, and travels between
processes and into JSON as a plain dict.  Percentiles use the nearest-rank definition.

`Timeline` counts completions in fixed-width time buckets (1 s for throughput over time,
finer for a failover window).  Both are pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from typing import Iterable

SUB_BITS = 6
SUB = 1 << SUB_BITS  # 64 buckets per power of two above the exact range
EXACT = SUB << 1  # values below 128 µs are exact


def bucket_of(value_us: int) -> int:
    """The bucket index of a non-negative integer value."""
    if value_us < EXACT:
        return max(0, value_us)
    shift = value_us.bit_length() - (SUB_BITS + 1)
    return (shift + 1) * SUB + (value_us >> shift) - SUB


def bucket_range(index: int) -> tuple[int, int]:
    """(lowest, highest) value that falls in bucket `index`, both inclusive."""
    if index < EXACT:
        return index, index
    shift = index // SUB - 1
    mantissa = index - shift * SUB
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Log-linear histogram of integer microsecond values.  Not thread-safe."""

    __slots__ = ("counts", "count", "total_us", "min_us", "max_us")

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_us = 0
        self.min_us: int | None = None
        self.max_us: int | None = None

    def record(self, value_us: int, n: int = 1) -> None:
        value_us = int(value_us)
        if value_us < 0:
            value_us = 0
        b = bucket_of(value_us)
        self.counts[b] = self.counts.get(b, 0) + n
        self.count += n
        self.total_us += value_us * n
        if self.min_us is None or value_us < self.min_us:
            self.min_us = value_us
        if self.max_us is None or value_us > self.max_us:
            self.max_us = value_us

    def record_s(self, seconds: float) -> None:
        self.record(round(seconds * 1e6))

    def merge(self, other: "Histogram") -> "Histogram":
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        self.count += other.count
        self.total_us += other.total_us
        if other.min_us is not None:
            self.min_us = other.min_us if self.min_us is None else min(self.min_us, other.min_us)
        if other.max_us is not None:
            self.max_us = other.max_us if self.max_us is None else max(self.max_us, other.max_us)
        return self

    def percentile_us(self, p: float) -> float | None:
        """Nearest-rank percentile (p in 0..100); None when empty."""
        if not self.count:
            return None
        if p >= 100:
            return float(self.max_us)
        # Rounded first so that 99.9% of 5000 is rank 4995, not 4996 through float error.
        rank = max(1, math.ceil(round(p * self.count / 100, 6)))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                lo, hi = bucket_range(b)
                mid = (lo + hi) / 2
                return float(min(max(mid, self.min_us), self.max_us))
        return float(self.max_us)  # pragma: no cover - counts and count disagree

    def mean_us(self) -> float | None:
        return self.total_us / self.count if self.count else None

    def cdf(self) -> list[tuple[float, float]]:
        """[(upper value µs, fraction of values <= it)] per non-empty bucket, ascending."""
        out, seen = [], 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            out.append((float(min(bucket_range(b)[1], self.max_us)), seen / self.count))
        return out

    def summary_ms(self) -> dict:
        """count, mean and p50/p90/p99/p99.9/max in milliseconds (None when empty)."""

        def ms(v):
            return None if v is None else round(v / 1000, 3)

        return {"count": self.count, "mean_ms": ms(self.mean_us()),
                "min_ms": ms(self.min_us), "p50_ms": ms(self.percentile_us(50)),
                "p90_ms": ms(self.percentile_us(90)), "p99_ms": ms(self.percentile_us(99)),
                "p999_ms": ms(self.percentile_us(99.9)), "max_ms": ms(self.max_us)}

    def to_dict(self) -> dict:
        return {"counts": {str(b): c for b, c in sorted(self.counts.items())},
                "count": self.count, "total_us": self.total_us,
                "min_us": self.min_us, "max_us": self.max_us}

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        h = cls()
        h.counts = {int(b): c for b, c in d.get("counts", {}).items()}
        h.count, h.total_us = d.get("count", 0), d.get("total_us", 0)
        h.min_us, h.max_us = d.get("min_us"), d.get("max_us")
        return h

    @classmethod
    def of(cls, values_us: Iterable[int]) -> "Histogram":
        h = cls()
        for v in values_us:
            h.record(v)
        return h


class Timeline:
    """Completions counted per `width_s` bucket, keyed by bucket number from time `origin`."""

    __slots__ = ("origin", "width_s", "counts")

    def __init__(self, origin: float, width_s: float = 1.0):
        self.origin = origin
        self.width_s = width_s
        self.counts: dict[int, int] = {}

    def add(self, t: float, n: int = 1) -> None:
        k = math.floor((t - self.origin) / self.width_s)
        self.counts[k] = self.counts.get(k, 0) + n

    def merge(self, other: "Timeline") -> "Timeline":
        assert other.width_s == self.width_s and other.origin == self.origin
        for k, c in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + c
        return self

    def series(self, first: int | None = None, last: int | None = None) -> list[tuple[float, float]]:
        """[(bucket start in s from origin, rate per second)], gaps filled with zero."""
        if not self.counts and (first is None or last is None):
            return []
        first = min(self.counts) if first is None else first
        last = max(self.counts) if last is None else last
        return [(k * self.width_s, self.counts.get(k, 0) / self.width_s)
                for k in range(first, last + 1)]

    def to_dict(self) -> dict:
        return {"origin": self.origin, "width_s": self.width_s,
                "counts": {str(k): c for k, c in sorted(self.counts.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Timeline":
        t = cls(d["origin"], d["width_s"])
        t.counts = {int(k): c for k, c in d["counts"].items()}
        return t

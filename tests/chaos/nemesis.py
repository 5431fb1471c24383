"""The nemesis: faults on a seeded schedule, each applied, held, healed and logged.

Design.  `make_schedule(seed, ...)` draws the whole schedule up front from one
`random.Random(seed)`, so `--seed N` replays it: a list of rounds, each a fault (or a
combination of two) with its parameters and how long it is held.  Targets are *roles*
("leader", "follower", "any") resolved when the round starts — by asking the nodes who leads —
with a random choice drawn from a generator seeded by (seed, round), so a replay picks the same
node whenever the cluster is in the same shape.  Every action goes into the history's nemesis
log with the concrete nodes, so a report can line faults up with operations.

Fault kinds (the layout decides which are possible):

======================  =========================================================  ==========
kind                    what                                                       layouts
======================  =========================================================  ==========
kill                    SIGKILL a node (leader/follower/any), restart it at heal   all
kill-all                SIGKILL every node, restart them all at heal               all
pause                   SIGSTOP a node, SIGCONT at heal                            all
skew                    restart a node with its wall clock off by N ms; at heal     all
                        restart it with the true clock
partition               split the nodes (halves / isolate the leader / bridge:      netns,
                        one node sees both sides), both directions                 proxy
partition-oneway        the leader hears nobody ("deaf") or nobody hears it        netns,
                        ("mute")                                                   proxy
link-down               a node's only link down (clients cut off too)              netns
delay                   every message of some links late by D±J ms                proxy
loss                    messages of some links lost with probability p             proxy
duplicate               messages of some links delivered twice with probability p   proxy
zk-kill, zk-pause       SIGKILL / SIGSTOP one ZooKeeper server (the ZK leader or    with a ZK
                        any), restart / resume at heal                             ensemble
======================  =========================================================  ==========

Heals run in reverse order of application and never raise: a heal that fails is logged and the
next round starts from whatever state there is (`heal_all()` cleans up at the end).
"""

from __future__ import annotations

import random
import time
from typing import Any

from chaos.cluster import ChaosCluster
from chaos.history import History

KINDS = {
    "loopback": ["kill", "kill-all", "pause", "skew"],
    "netns": ["kill", "kill-all", "pause", "skew", "partition", "partition-oneway", "link-down"],
    "proxy": ["kill", "pause", "skew", "partition", "partition-oneway", "delay", "loss",
              "duplicate"],
}
#: Faults on the ZooKeeper ensemble, for modes that use one (zk-election).
ZK_KINDS = ["zk-kill", "zk-pause"]
#: Relative weights when drawing a fault.
WEIGHTS = {"zk-kill": 2, "zk-pause": 2,
           "kill": 4, "kill-all": 1, "pause": 3, "skew": 2, "partition": 4,
           "partition-oneway": 2, "link-down": 2, "delay": 3, "loss": 3, "duplicate": 1}
SKEWS_MS = [-3000, -1200, 800, 2500, 60_000, 700_000]


def _draw(rng: random.Random, kind: str, n: int) -> dict:
    f: dict[str, Any] = {"kind": kind}
    if kind in ("kill", "pause", "skew", "link-down", "zk-kill", "zk-pause"):
        f["target"] = rng.choice(["leader", "leader", "follower", "any"])
    if kind == "skew":
        f["skew_ms"] = rng.choice(SKEWS_MS)
    if kind == "partition":
        f["shape"] = rng.choice(["halves", "isolate-leader", "bridge"])
    if kind == "partition-oneway":
        f["shape"] = rng.choice(["leader-deaf", "leader-mute"])
    if kind in ("delay", "loss", "duplicate"):
        f["links"] = rng.choice(["all", "leader", "one-node"])
    if kind == "delay":
        f["delay_ms"] = rng.choice([30, 100, 250, 600])
        f["jitter_ms"] = rng.choice([0, 50, 200])
    if kind == "loss":
        f["drop_p"] = rng.choice([0.05, 0.2, 0.5])
    if kind == "duplicate":
        f["dup_p"] = rng.choice([0.1, 0.4])
    return f


def make_schedule(seed: int, rounds: int, topology: str, n: int, *,
                  hold_s: tuple[float, float] = (2.0, 5.0), combo_p: float = 0.25,
                  kinds: list[str] | None = None, first: list[str] | None = None,
                  zk: bool = False) -> list[dict]:
    """The seeded schedule.  `kinds` limits the faults drawn; `first` lists kinds that open
    the schedule, in that order (so a short run covers them all), each optionally pinned to a
    role, shape or link set as "kill:leader", "partition:bridge", "delay:all", and combined as
    "duplicate:all+kill:leader"."""
    rng = random.Random(seed)
    possible = KINDS[topology] + (ZK_KINDS if zk else [])
    allowed = [k for k in (kinds or possible) if k in possible]
    for f in (x for item in first or () for x in item.split("+")):
        if f.partition(":")[0] not in possible:
            raise ValueError(f"fault {f!r} is not possible in the {topology} layout "
                             f"(possible: {', '.join(possible)})")
    weights = [WEIGHTS[k] for k in allowed]
    out = []
    for r in range(rounds):
        if first and r < len(first):
            parts = []
            for item in first[r].split("+"):  # "delay+kill:leader" combines two faults
                kind, _, target = item.partition(":")
                part = _draw(rng, kind, n)
                if target:  # "kill:leader" pins the role; "partition:bridge" the shape
                    part["shape" if "shape" in part else "links" if "links" in part
                         else "target"] = target
                parts.append(part)
        else:
            parts = [_draw(rng, rng.choices(allowed, weights)[0], n)]
            if rng.random() < combo_p:
                second = rng.choices(allowed, weights)[0]
                if {second, parts[0]["kind"]} & {"kill-all"} or second == parts[0]["kind"]:
                    second = None
                if second:
                    parts.append(_draw(rng, second, n))
        out.append({"round": r, "parts": parts, "hold_s": round(rng.uniform(*hold_s), 2)})
    return out


def describe(rnd: dict) -> str:
    parts = []
    for p in rnd["parts"]:
        extra = ",".join(f"{k}={v}" for k, v in p.items() if k != "kind")
        parts.append(p["kind"] + (f"({extra})" if extra else ""))
    return f"round {rnd['round']}: " + " + ".join(parts) + f" for {rnd['hold_s']} s"


class Nemesis:
    def __init__(self, cluster: ChaosCluster, history: History, seed: int):
        self.c = cluster
        self.h = history
        self.seed = seed
        self.applied: list[tuple[dict, dict]] = []  # (part, resolved) not yet healed
        self.counts: dict[str, int] = {}

    # --- helpers ------------------------------------------------------------------------------

    def _pick(self, role: str, rng: random.Random, exclude=()) -> str:
        ids = [i for i in self.c.ids if i not in exclude]
        leader = self.c.leader(0.5)
        if role == "leader" and leader in ids:
            return leader
        if role == "follower":
            others = [i for i in ids if i != leader]
            if others:
                return rng.choice(others)
        return rng.choice(ids)

    def _sides(self, shape: str, rng: random.Random) -> list[tuple[str, str]]:
        """Pairs to cut for a partition shape."""
        ids = list(self.c.ids)
        leader = self._pick("leader", rng)
        if shape == "isolate-leader":
            return [(leader, o) for o in ids if o != leader]
        if shape == "bridge":
            # Two sides that both see one bridge node and not each other.
            others = [i for i in ids if i != leader]
            bridge = rng.choice(others)
            rest = [i for i in ids if i != bridge]
            rng.shuffle(rest)
            if leader in rest:  # keep the leader on a side, so it loses half its followers
                rest.remove(leader)
                rest.insert(0, leader)
            a, b = rest[: len(rest) // 2], rest[len(rest) // 2:]
            return [(x, y) for x in a for y in b]
        shuffled = ids[:]
        rng.shuffle(shuffled)
        k = len(ids) // 2
        a, b = shuffled[:k], shuffled[k:]
        return [(x, y) for x in a for y in b]

    def _links(self, which: str, rng: random.Random) -> list[tuple[str, str]]:
        ids = self.c.ids
        pairs = [(a, b) for a in ids for b in ids if a != b]
        if which == "all":
            return pairs
        node = self._pick("leader" if which == "leader" else "any", rng)
        return [(a, b) for a, b in pairs if node in (a, b)]

    def _blackhole(self, src: int, dst: int, on: bool) -> None:
        old = self.c.proxy.links.get((src, dst))
        merged = dict(vars(old)) if old else {}
        merged["blackhole"] = on
        self.c.proxy.set_link(src, dst, **merged)

    # --- apply / heal -------------------------------------------------------------------------

    def apply(self, rnd: dict) -> list[dict]:
        rng = random.Random(f"{self.seed}/{rnd['round']}")
        resolved_all = []
        used: set[str] = set()
        for part in rnd["parts"]:
            kind = part["kind"]
            self.counts[kind] = self.counts.get(kind, 0) + 1
            try:
                resolved = self._apply(part, rng, used)
            except Exception as e:
                resolved = {"error": repr(e)}
            self.applied.append((part, resolved))
            resolved_all.append(resolved)
            self.h.log_nemesis("start", round=rnd["round"], fault=part, resolved=resolved)
        return resolved_all

    def _apply(self, part: dict, rng: random.Random, used: set) -> dict:
        c, kind = self.c, part["kind"]
        if kind in ("kill", "pause", "skew", "link-down"):
            nid = self._pick(part["target"], rng, exclude=used)
            used.add(nid)
            if kind == "kill":
                c.kill(nid)
            elif kind == "pause":
                c.pause(nid)
            elif kind == "skew":
                c.stop(nid)
                c.start(nid, skew_ms=part["skew_ms"])
            else:
                c.net.link_down(c.index[nid])
            return {"node": nid}
        if kind in ("zk-kill", "zk-pause"):
            servers = [z for z in c.zk.servers if z.running]
            leader = next((z for z in servers if z.mode() == "leader"), None)
            z = leader if part["target"] == "leader" and leader else rng.choice(servers)
            z.kill() if kind == "zk-kill" else z.pause()
            return {"zk_server": z.server_id}
        if kind == "kill-all":
            for nid in c.ids:
                c.kill(nid)
            return {"nodes": list(c.ids)}
        if kind in ("partition", "partition-oneway"):
            if kind == "partition":
                pairs = [(a, b) for x, y in self._sides(part["shape"], rng)
                         for a, b in ((x, y), (y, x))]
            else:
                leader = self._pick("leader", rng)
                others = [o for o in c.ids if o != leader]
                # (dst, src): dst stops hearing src.
                pairs = ([(leader, o) for o in others] if part["shape"] == "leader-deaf"
                         else [(o, leader) for o in others])
            for dst, src in pairs:
                if c.net is not None:
                    c.net.block(c.index[dst], c.index[src])
                else:
                    self._blackhole(c.index[src], c.index[dst], True)
            return {"blocked(dst<-src)": [f"{d}<-{s}" for d, s in pairs]}
        if kind in ("delay", "loss", "duplicate"):
            links = self._links(part["links"], rng)
            faults = {"delay": {"delay_ms": part.get("delay_ms", 0),
                                "jitter_ms": part.get("jitter_ms", 0)},
                      "loss": {"drop_p": part.get("drop_p", 0)},
                      "duplicate": {"dup_p": part.get("dup_p", 0)}}[kind]
            for a, b in links:
                old = c.proxy.links.get((c.index[a], c.index[b]))
                merged = dict(vars(old)) if old else {}
                merged.update(faults)
                c.proxy.set_link(c.index[a], c.index[b], **merged)
            return {"links": [f"{a}->{b}" for a, b in links], **faults}
        raise ValueError(f"unknown fault kind {kind!r}")

    def heal(self, round_no: int | None = None) -> None:
        """Undo what is applied, newest first.  Never raises."""
        while self.applied:
            part, resolved = self.applied.pop()
            try:
                self._heal(part, resolved)
                self.h.log_nemesis("heal", round=round_no, fault=part, resolved=resolved)
            except Exception as e:
                self.h.log_nemesis("heal-failed", round=round_no, fault=part, error=repr(e))

    def _heal(self, part: dict, resolved: dict) -> None:
        c, kind = self.c, part["kind"]
        if "error" in resolved:
            return
        if kind == "kill":
            c.start(resolved["node"])
        elif kind == "kill-all":
            c.start()
        elif kind in ("zk-kill", "zk-pause"):
            z = c.zk.servers[resolved["zk_server"] - 1]
            if kind == "zk-kill":
                z.start()
            else:
                z.resume()
        elif kind == "pause":
            c.resume(resolved["node"])
        elif kind == "skew":
            c.stop(resolved["node"])
            c.start(resolved["node"], skew_ms=0)
        elif kind == "link-down":
            c.net.link_up(c.index[resolved["node"]])
        elif kind in ("partition", "partition-oneway"):
            if c.net is not None:
                c.net.heal()
            else:
                for link in resolved["blocked(dst<-src)"]:
                    dst, src = link.split("<-")
                    self._blackhole(c.index[src], c.index[dst], False)
        elif kind in ("delay", "loss", "duplicate"):
            zero = {"delay": {"delay_ms": 0, "jitter_ms": 0}, "loss": {"drop_p": 0},
                    "duplicate": {"dup_p": 0}}[kind]
            for link in resolved["links"]:
                a, b = (c.index[x] for x in link.split("->"))
                old = c.proxy.links.get((a, b))
                merged = dict(vars(old)) if old else {}
                merged.update(zero)
                c.proxy.set_link(a, b, **merged)

    def heal_all(self) -> None:
        """Whatever happened: every node running, unpaused, true clock, network whole."""
        self.heal()
        c = self.c
        for nid in list(c.paused):
            c.resume(nid)
        if c.net is not None:
            c.net.heal()
        if c.proxy is not None:
            c.proxy.clear()
        for nid in c.ids:
            if c.skew_ms.get(nid):
                c.stop(nid)
                c.start(nid, skew_ms=0)
        c.start()
        self.h.log_nemesis("heal-all")


def hold(seconds: float, check=None) -> None:
    """Let a fault act for `seconds`, watching the nodes (`check()`) meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check is not None:
            check()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


__all__ = ["make_schedule", "describe", "Nemesis", "hold", "KINDS"]

"""The chaos workload: concurrent clients moving money inside small groups of accounts.

Design.  Accounts come in disjoint *groups* (one currency each): a `bank` that may go negative
and a few accounts with `debits_must_not_exceed_credits` that the bank funds at set-up.  Money
never leaves its group, which makes the checkers' per-group linearizability exact and gives each
currency a total to conserve.

Each worker is one logical client (`AsyncClient`, so one session) running in one asyncio loop
with the others, in a thread of its own.  A worker repeatedly picks a group and one of:
a plain transfer, a pending transfer, posting or voiding one of its own open pending transfers,
a linearizable balance read, or a follower read at one node chosen at random with
`min_version` = the highest version this worker has seen (read-your-writes).  Amounts are large
enough that constrained accounts sometimes refuse (`exceeds_credits`).

Every call is recorded in the `History` before it is sent and completed when it ends:
`ok` with the answer, `fail` when the client says nothing was applied (`Unavailable`), `info`
when it cannot know (`OutcomeUnknown`, anything unexpected).  A transfer whose outcome is
unknown is sent again with the same id and body — each attempt its own history entry — a few
times at once, then again between the worker's later operations, and finally in `resolve()`
after the faults are healed, until it has a definite answer; ids make that safe, and the
checkers verify it was.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

from raftpay.client import AsyncClient
from raftpay.codes import OutcomeUnknown, RequestRejected, Unavailable

from chaos.history import History
from chaos.model import DEBITS_MUST_NOT_EXCEED_CREDITS

OK, EXISTS = 0, 48


def make_spec(prefix: str, groups: int = 3, constrained: int = 3, funding: int = 400) -> dict:
    out = {"groups": {}, "funding": funding}
    for g in range(1, groups + 1):
        name = f"{prefix}g{g}"
        accts = {f"{name}-bank": 0}
        for k in range(constrained):
            accts[f"{name}-{'abcdefgh'[k]}"] = DEBITS_MUST_NOT_EXCEED_CREDITS
        out["groups"][name] = {"currency": g, "accounts": accts}
    return out


def _balances(accounts) -> list:
    return [None if a is None else [a["debits_pending"], a["debits_posted"],
                                    a["credits_pending"], a["credits_posted"]]
            for a in accounts]


class Worker:
    def __init__(self, wl: "Workload", name: str, seed: int):
        self.wl = wl
        self.name = name
        self.rng = random.Random(seed)
        # Impatient clients see more unknown outcomes (and retry them), patient ones ride the
        # faults out: a mix of both exercises both paths.
        timeout_s = self.rng.choice(wl.op_timeouts_s)
        attempt_s = min(wl.attempt_timeout_s, timeout_s / 2)
        self.client = AsyncClient(wl.seeds, timeout_s=timeout_s, attempt_timeout_s=attempt_s)
        self.readers = {a: AsyncClient([a], timeout_s=timeout_s, attempt_timeout_s=attempt_s,
                                       use_session=False)
                        for a in wl.seeds}
        self.seq = 0
        self.max_version = 0
        self.open_pending: list[dict] = []  # acknowledged pending transfers not yet resolved
        self.unresolved: list[tuple[str, dict]] = []  # (group, value) with unknown outcome

    async def close(self) -> None:
        await self.client.close()
        for c in self.readers.values():
            await c.close()

    # --- one recorded call --------------------------------------------------------------------

    async def _submit(self, group: str, value: dict, event: dict) -> dict:
        h = self.wl.history
        op = h.invoke(self.name, "transfer", value, group)
        try:
            rb = await self.client._call("submit", {"events": [event]})
        except OutcomeUnknown as e:
            return h.complete(op, "info", error=f"outcome unknown: {e}")
        except Unavailable as e:
            return h.complete(op, "fail", error=f"unavailable: {e}")
        except RequestRejected as e:
            self.wl.count("rejected")
            return h.complete(op, "info", error=f"rejected: {e}")
        except Exception as e:  # anything else: we cannot know
            self.wl.count("client_error")
            return h.complete(op, "info", error=f"{type(e).__name__}: {e}")
        version = rb.get("version")
        if version:
            self.max_version = max(self.max_version, version)
        return h.complete(op, "ok", rb["results"][0], version=version,
                          node=self.client._core.leader)

    async def transfer(self, group: str, value: dict, retries: int) -> dict:
        """Send a transfer; while the outcome is unknown send it again (same id and body)."""
        event = {"op": "create_transfer", "id": value["id"]}
        if value["kind"] in ("post", "void"):
            event["pending_id"] = value["pending_id"]
            event["flags"] = 4 if value["kind"] == "post" else 8
            if value.get("amount") is not None:
                event["amount"] = value["amount"]
        else:
            event.update(debit_account_id=value["dr"], credit_account_id=value["cr"],
                         amount=value["amount"], currency=value["currency"],
                         flags=2 if value["kind"] == "pending" else 0)
        op = await self._submit(group, value, event)
        tries = 0
        while op["type"] == "info" and tries < retries and not self.wl.stopping:
            tries += 1
            await asyncio.sleep(0.05 * tries)
            op = await self._submit(group, value, event)
        if op["type"] == "info":
            self.unresolved.append((group, value))
        elif value["kind"] == "pending" and op["type"] == "ok" and op["result"] in (OK, EXISTS):
            self.open_pending.append({"group": group, **value})
        return op

    async def read(self, group: str, follower: bool) -> dict:
        h = self.wl.history
        accounts = list(self.wl.spec["groups"][group]["accounts"])
        body = {"ids": accounts, "consistency": "follower" if follower else "linearizable"}
        value = {"accounts": accounts, "consistency": body["consistency"]}
        client = self.client
        if follower:
            addr = self.rng.choice(self.wl.seeds)
            client = self.readers[addr]
            if self.max_version:
                body["min_version"] = value["min_version"] = self.max_version
            value["node"] = addr
        op = h.invoke(self.name, "read", value, group)
        try:
            rb = await client._call("lookup_accounts", body)
        except (OutcomeUnknown, Unavailable) as e:
            return h.complete(op, "fail", error=f"{type(e).__name__}: {e}")
        except Exception as e:
            self.wl.count("client_error")
            return h.complete(op, "fail", error=f"{type(e).__name__}: {e}")
        version = rb.get("version")
        if version:
            self.max_version = max(self.max_version, version)
        return h.complete(op, "ok", _balances(rb["accounts"]), version=version)

    # --- the loop -----------------------------------------------------------------------------

    def _new_id(self, group: str, kind: str) -> str:
        self.seq += 1
        return f"{group}-{self.name}-{kind[0]}{self.seq}"

    async def one(self) -> None:
        wl, rng = self.wl, self.rng
        group = rng.choice(list(wl.spec["groups"]))
        gs = wl.spec["groups"][group]
        accts = list(gs["accounts"])
        r = rng.random()
        mix = wl.mix
        if r < mix["resolve"] and any(p["group"] == group for p in self.open_pending):
            p = next(p for p in self.open_pending if p["group"] == group)
            self.open_pending.remove(p)
            kind = "post" if rng.random() < 0.6 else "void"
            amount = None
            if kind == "post" and rng.random() < 0.3:
                amount = rng.randint(1, p["amount"])
            value = {"id": self._new_id(group, kind), "kind": kind, "dr": p["dr"], "cr": p["cr"],
                     "amount": amount, "currency": None, "pending_id": p["id"]}
            await self.transfer(group, value, wl.retries)
        elif r < mix["resolve"] + mix["transfer"]:
            await self._move(group, gs, accts, "plain")
        elif r < mix["resolve"] + mix["transfer"] + mix["pending"]:
            await self._move(group, gs, accts, "pending")
        elif r < mix["resolve"] + mix["transfer"] + mix["pending"] + mix["read"]:
            await self.read(group, follower=False)
        else:
            await self.read(group, follower=True)

    async def _move(self, group, gs, accts, kind) -> None:
        dr, cr = self.rng.sample(accts, 2)
        value = {"id": self._new_id(group, kind), "kind": kind, "dr": dr, "cr": cr,
                 "amount": self.rng.randint(1, 150), "currency": gs["currency"],
                 "pending_id": None}
        await self.transfer(group, value, self.wl.retries)

    async def run(self) -> None:
        while not self.wl.stopping:
            if self.unresolved and self.rng.random() < 0.5:
                # A real client keeps retrying an unknown payment (same id) until it knows.
                group, value = self.unresolved.pop(0)
                await self.transfer(group, value, retries=0)
            else:
                await self.one()
            lo, hi = self.wl.think_ms
            await asyncio.sleep(self.rng.uniform(lo, hi) / 1000)

    async def resolve(self, deadline: float) -> None:
        """Send every unknown transfer again until it has a definite answer or time runs out."""
        todo, self.unresolved = self.unresolved, []
        while todo and time.monotonic() < deadline:
            group, value = todo.pop(0)
            op = await self.transfer(group, value, retries=0)
            if op["type"] == "info":
                self.unresolved.remove((group, value))
                todo.append((group, value))
                await asyncio.sleep(0.2)


class Workload:
    """Runs the workers in a background thread.  `setup()`, `start()`, then `finish()`."""

    #: Shares of each kind of operation; the rest are follower reads.
    DEFAULT_MIX = {"resolve": 0.15, "transfer": 0.40, "pending": 0.12, "read": 0.18}

    def __init__(self, history: History, spec: dict, seeds: list[str], *, seed: int = 0,
                 workers: int = 8, op_timeouts_s: tuple[float, ...] = (0.8, 1.5, 4.0),
                 attempt_timeout_s: float = 1.0, think_ms: tuple[float, float] = (0, 20),
                 retries: int = 2, mix: dict | None = None):
        self.history = history
        self.spec = spec
        self.seeds = list(seeds)
        self.seed = seed
        self.n_workers = workers
        self.op_timeouts_s = op_timeouts_s
        self.op_timeout_s = max(op_timeouts_s)
        self.attempt_timeout_s = attempt_timeout_s
        self.think_ms = think_ms
        self.retries = retries
        self.mix = mix or self.DEFAULT_MIX
        self.stopping = False
        self.counters: dict[str, int] = {}
        self.workers: list[Worker] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-workload",
                                        daemon=True)
        self._thread.start()
        self._tasks: list = []

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _run(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def setup(self, timeout_s: float = 60.0) -> None:
        """Create every account and fund the constrained ones from their bank; each call is
        recorded and retried until it has a definite answer.  Raises if that fails."""

        async def go():
            w = Worker(self, "setup", self.seed)
            try:
                deadline = time.monotonic() + timeout_s
                for g, gs in self.spec["groups"].items():
                    for a, flags in gs["accounts"].items():
                        await self._create_account(w, g, a, gs["currency"], flags, deadline)
                    bank = next(iter(gs["accounts"]))
                    for a in list(gs["accounts"])[1:]:
                        value = {"id": f"{g}-fund-{a}", "kind": "plain", "dr": bank, "cr": a,
                                 "amount": self.spec.get("funding", 400),
                                 "currency": gs["currency"], "pending_id": None}
                        op = await w.transfer(g, value, retries=1000)
                        while op["type"] != "ok" or op["result"] not in (OK, EXISTS):
                            if time.monotonic() > deadline:
                                raise RuntimeError(f"set-up transfer failed: {op}")
                            await asyncio.sleep(0.2)
                            op = await w.transfer(g, value, retries=0)
                        w.unresolved.clear()
            finally:
                await w.close()

        self._run(go(), timeout_s + 10)

    async def _create_account(self, w: Worker, g, a, currency, flags, deadline) -> None:
        value = {"id": a, "flags": flags}
        while True:
            op = self.history.invoke("setup", "create_account", value, g)
            try:
                rb = await w.client._call("submit", {"events": [{
                    "op": "create_account", "id": a, "currency": currency, "flags": flags}]})
                self.history.complete(op, "ok", rb["results"][0], version=rb.get("version"))
                if rb["results"][0] in (OK, EXISTS):
                    return
                raise RuntimeError(f"create_account {a}: {rb}")
            except OutcomeUnknown as e:
                self.history.complete(op, "info", error=str(e))
            except Unavailable as e:
                self.history.complete(op, "fail", error=str(e))
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not create account {a}")
            await asyncio.sleep(0.2)

    def start(self) -> None:
        async def spawn():
            rng = random.Random(self.seed)
            for k in range(self.n_workers):
                w = Worker(self, f"w{k}", rng.randrange(2 ** 32))
                self.workers.append(w)
                self._tasks.append(asyncio.ensure_future(w.run()))

        self._run(spawn(), 10)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking new operations; wait for the ones in flight."""
        self.stopping = True

        async def wait():
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=timeout_s)

        self._run(wait(), timeout_s + 5)

    def resolve(self, timeout_s: float = 60.0) -> int:
        """Retry every unknown transfer until answered; returns how many stay unknown."""
        deadline = time.monotonic() + timeout_s

        async def go():
            await asyncio.gather(*(w.resolve(deadline) for w in self.workers))
            return sum(len(w.unresolved) for w in self.workers)

        self.stopping = False  # let transfer() retry
        try:
            return self._run(go(), timeout_s + 30)
        finally:
            self.stopping = True

    def close(self) -> None:
        async def go():
            for w in self.workers:
                await w.close()

        try:
            self._run(go(), 10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

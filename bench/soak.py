"""Soak under leader kills: full load for a while, kill -9 the leader every few seconds.

    python -m bench.soak [--seconds 60] [--kill-every 10] [--clients 64] [--fsync always]

Checks, from what the clients recorded and the final state only: zero CRITICAL truncation
messages in any node log, every acknowledged transfer present exactly once, every unknown one at
most once (each id is retried until it resolves), money conserved, and every replica on the same
state hash.  Prints a JSON summary; exits 1 if any check fails.  The nodes' data and logs are
removed when every check passes, and kept (their directory named on stderr) when one fails or
with --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time

from raftpay.cli import LocalCluster
from raftpay.client import AsyncClient, Client
from raftpay.codes import Code, OutcomeUnknown, Unavailable
from raftpay.config import RaftConfig
from bench.clusters import free_ports, replica_hashes

ACCOUNTS = 16


async def _payer(seeds: str, k: int, stop_at: float, acked: dict, unknown: dict,
                 errors: dict) -> None:
    async with AsyncClient(seeds, timeout_s=15) as c:
        i = 0
        while time.monotonic() < stop_at:
            tid = f"soak-{k}-{i}"
            body = dict(debit_account_id=f"acc-{(k + i) % ACCOUNTS}",
                        credit_account_id=f"acc-{(k + i + 1) % ACCOUNTS}", amount=1 + i % 7,
                        currency=1)
            try:
                code = await c.transfer(tid, **body)
                if code in (Code.OK, Code.EXISTS):
                    acked[tid] = body
                else:
                    errors[Code(code).name] = errors.get(Code(code).name, 0) + 1
            except (OutcomeUnknown, Unavailable) as e:
                unknown[tid] = body
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            i += 1


async def _load(seeds: str, clients: int, seconds: float, acked, unknown, errors) -> None:
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*[_payer(seeds, k, stop_at, acked, unknown, errors)
                           for k in range(clients)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kill-every", type=float, default=10)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--fsync", choices=["always", "never"], default="always")
    ap.add_argument("--keep", action="store_true",
                    help="keep the nodes' data and logs (kept anyway when a check fails)")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="raftpay-soak-")
    ports = free_ports(2 * args.nodes)
    cluster = LocalCluster(args.nodes, tmp, 0, ports=[(ports[2 * i], ports[2 * i + 1])
                                                      for i in range(args.nodes)],
                           raft=RaftConfig(fsync=args.fsync))
    acked: dict = {}
    unknown: dict = {}
    errors: dict = {}
    kills = []
    ok = False
    try:
        cluster.start()
        cluster.wait_for_leader(30)
        with Client(cluster.seeds) as c:
            res = c.create_accounts([{"id": f"acc-{i}", "currency": 1} for i in range(ACCOUNTS)])
            assert all(r in (Code.OK, Code.EXISTS) for r in res), res

        import threading

        def killer():
            t0 = time.monotonic()
            while time.monotonic() - t0 + args.kill_every < args.seconds:
                time.sleep(args.kill_every)
                try:
                    addr = cluster.wait_for_leader(15)
                except TimeoutError:
                    continue
                victim = next(x.node.id for x in cluster.configs if x.node.client_addr == addr)
                cluster.kill(victim)
                kills.append((round(time.monotonic() - t0, 1), victim))
                time.sleep(1.0)
                cluster.start(victim)

        t = threading.Thread(target=killer, daemon=True)
        started = time.monotonic()
        t.start()
        asyncio.run(_load(cluster.seeds, args.clients, args.seconds, acked, unknown, errors))
        elapsed = time.monotonic() - started
        t.join(30)

        # Resolve every id: acknowledged ones must answer exists; unknown ones apply at most once.
        resolved_unknown = 0
        with Client(cluster.seeds, timeout_s=60) as c:
            items = list(acked.items()) + list(unknown.items())
            for k in range(0, len(items), 5000):  # the same events again, in large batches
                chunk = items[k:k + 5000]
                codes = c.create_transfers([dict(id=tid, **body) for tid, body in chunk])
                for (tid, _), code in zip(chunk, codes):
                    if tid in acked and code != Code.EXISTS:
                        raise AssertionError(f"acknowledged {tid} answered {Code(code).name}")
                    resolved_unknown += tid in unknown and code == Code.EXISTS
            all_ids = {**acked, **unknown}
            ids = list(all_ids)
            found = [t for k in range(0, len(ids), 10_000)
                     for t in c.lookup_transfers(ids[k:k + 10_000])]
            present = sum(1 for t in found if t is not None and t["status"] == "posted")
            accounts = c.lookup_accounts([f"acc-{i}" for i in range(ACCOUNTS)])
            debits = sum(a["debits_posted"] for a in accounts)
            credits = sum(a["credits_posted"] for a in accounts)
            expected = sum(b["amount"] for b in all_ids.values())
            seen = 0
            for i in range(ACCOUNTS):
                cursor = 0
                while cursor is not None:
                    page, cursor = c.account_transfers(f"acc-{i}", limit=10_000, cursor=cursor)
                    seen += sum(1 for tr in page if tr["debit_account_id"] == f"acc-{i}")
        hashes = replica_hashes({c.node.id: c.node.client_addr for c in cluster.configs})
        truncations = 0
        for cfg in cluster.configs:
            with open(cluster.log_path(cfg.node.id), errors="replace") as f:
                truncations += f.read().count("truncating")
        summary = {
            "seconds": round(elapsed, 1), "clients": args.clients, "fsync": args.fsync,
            "kills": kills, "acknowledged": len(acked), "unknown_at_first": len(unknown),
            "unknown_found_applied": resolved_unknown,
            "throughput_acked_per_s": round(len(acked) / elapsed),
            "errors": errors, "present_exactly_once": present == len(all_ids) == seen,
            "money_conserved": debits == credits == expected,
            "critical_truncations": truncations, "replica_hashes": hashes,
        }
        ok = (summary["present_exactly_once"] and summary["money_conserved"]
              and truncations == 0 and len(set(hashes.values())) == 1 and len(hashes) == args.nodes
              and len(kills) >= 1)
        summary["ok"] = ok
        print(json.dumps(summary, indent=2))
        return 0 if ok else 1
    finally:
        cluster.stop()
        # Each run writes hundreds of MB; only a failed one is worth reading afterwards.
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"the nodes' data and logs are kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

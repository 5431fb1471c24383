"""The recorded history of a chaos run: every client operation and every nemesis action.

Design (Jepsen's history, flattened).  Each client operation is one record, written at its
invocation and completed in place: who (`process`), what (`f` and `value`), the group of
accounts it touches, invoke and complete times on both clocks (`*_mono` for ordering inside the
run, `*_wall` for lining up with node logs), and how it ended:

* ``ok``   — the cluster answered; `result` is the answer (a result code, or balances);
* ``fail`` — it certainly did not happen (the client raised `Unavailable`: no node took it);
* ``info`` — unknown: it may or may not have happened (`OutcomeUnknown`, or no answer at all).

A record that is never completed (the run ended under it) is saved as ``info``.  The nemesis
log is a second list of {time, action, detail}.  Both are saved as JSON lines, so a failed run
can be checked again offline (`run.py --check DIR`).

Thread-safe (one lock); the recorder never blocks on I/O.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class History:
    def __init__(self):
        self._lock = threading.Lock()
        self.ops: list[dict] = []
        self.nemesis: list[dict] = []
        self.t0_mono = time.monotonic()
        self.t0_wall = time.time()

    def invoke(self, process: str, f: str, value: dict, group: str | None = None) -> dict:
        op = {"process": process, "f": f, "group": group, "value": value,
              "invoke_mono": time.monotonic() - self.t0_mono, "invoke_wall": time.time(),
              "complete_mono": None, "complete_wall": None, "type": None, "result": None,
              "version": None, "error": None, "node": None}
        with self._lock:
            op["index"] = len(self.ops)
            self.ops.append(op)
        return op

    def complete(self, op: dict, type_: str, result: Any = None, *, version: int | None = None,
                 error: str | None = None, node: str | None = None) -> dict:
        assert type_ in ("ok", "fail", "info"), type_
        op.update(complete_mono=time.monotonic() - self.t0_mono, complete_wall=time.time(),
                  type=type_, result=result, version=version, error=error, node=node)
        return op

    def log_nemesis(self, action: str, **detail: Any) -> dict:
        entry = {"mono": time.monotonic() - self.t0_mono, "wall": time.time(),
                 "action": action, **detail}
        with self._lock:
            self.nemesis.append(entry)
        return entry

    def finished_ops(self) -> list[dict]:
        """All ops; any still open is reported as info (unknown) with no completion time."""
        with self._lock:
            out = []
            for op in self.ops:
                if op["type"] is None:
                    op = dict(op, type="info", error="never completed")
                out.append(op)
            return out

    def save(self, folder: str) -> tuple[str, str]:
        os.makedirs(folder, exist_ok=True)
        hp = os.path.join(folder, "history.jsonl")
        np_ = os.path.join(folder, "nemesis.jsonl")
        with open(hp, "w") as f:
            for op in self.finished_ops():
                f.write(json.dumps(op, default=str) + "\n")
        with open(np_, "w") as f:
            with self._lock:
                for e in self.nemesis:
                    f.write(json.dumps(e, default=str) + "\n")
        return hp, np_


def load_ops(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

"""Progress on stderr while the benchmark runs.

On a terminal one status line is redrawn in place; otherwise (CI logs, pipes) a line is printed
every few seconds, so a log shows the run moving without flooding it.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_steps = total_steps
        self.step = 0
        self.label = ""
        self.t0 = time.monotonic()
        self._last_line = 0.0
        self._last = (0.0, 0)

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:d}:{s % 60:02d}"

    def begin(self, label: str) -> None:
        self.step += 1
        self.label = label
        self._last = (time.monotonic(), 0)
        self._write(f"[{self.step}/{self.total_steps} {self._elapsed()}] {label}", final=False,
                    force=True)

    def update(self, elapsed_s: float, total_s: float, ok: int, err: int) -> None:
        now = time.monotonic()
        t_prev, ok_prev = self._last
        rate = (ok - ok_prev) / (now - t_prev) if now > t_prev else 0.0
        self._last = (now, ok)
        self._write(f"[{self.step}/{self.total_steps} {self._elapsed()}] {self.label}: "
                    f"{min(elapsed_s, total_s):5.1f}/{total_s:.1f} s  ok {ok:,}  "
                    f"errors {err:,}  {rate:,.0f}/s", final=False)

    def note(self, text: str) -> None:
        self._write(f"[{self.step}/{self.total_steps} {self._elapsed()}] {text}", final=True,
                    force=True)

    def done(self, text: str) -> None:
        self._write(f"[{self.step}/{self.total_steps} {self._elapsed()}] {self.label}: {text}",
                    final=True, force=True)

    def _write(self, line: str, final: bool, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self.stream.flush()
            return
        now = time.monotonic()
        if force or now - self._last_line >= 3.0:
            self._last_line = now
            self.stream.write(line + "\n")
            self.stream.flush()

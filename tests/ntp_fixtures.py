"""NTP servers for the SNTP tests: a real chronyd, and a small UDP server of our own.

chronyd answers like the NTP servers raftpay will meet, but it cannot lie on purpose: it sends
no kiss-o'-death, no skewed time, no broken replies.  `FakeNtpServer` does exactly those, one
behaviour per attribute, so each test names the misbehaviour it checks.

Test modules import from here directly (`from ntp_fixtures import ...`): pytest's default
"prepend" import mode puts tests/ on sys.path for rootdir-relative test files without an
__init__.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftpay.clock import NtpError, sntp_query

NTP_UNIX_DELTA_S = 2_208_988_800
_PACKET = struct.Struct("!BBbbII4sQQQQ")


def unassigned_udp_ports(rng: random.Random | None = None) -> Iterator[int]:
    """UDP ports on 127.0.0.1, free when yielded, from below the kernel's ephemeral range.

    A port the kernel picks for a bind to port 0 is one it may also hand to the next socket that
    sends without binding (a resolver, an NTP client) before our server binds it.  Ports below
    `ip_local_port_range` are never handed out that way, so only an explicit bind can take one;
    `start_chronyd` tries another port when that happens."""
    rng = rng or random.Random()
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 2048)
    while True:
        port = rng.randrange(1024, low)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        yield port


def to_ntp(unix_s: float) -> int:
    return int((unix_s + NTP_UNIX_DELTA_S) * (1 << 32)) & 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# chronyd
# --------------------------------------------------------------------------------------------

CHRONY_CONF = """\
port {port}
bindaddress 127.0.0.1
allow 127.0.0.1
local stratum 10
cmdport 0
# "/" turns off the Unix command socket, which otherwise lives at a fixed system path that a
# second chronyd (or the host's own) would fight over.
bindcmdaddress /
pidfile {dir}/chronyd.pid
"""


def chronyd_exe() -> str | None:
    return shutil.which("chronyd") or next(
        (p for p in ("/usr/sbin/chronyd", "/sbin/chronyd") if os.access(p, os.X_OK)), None
    )


# What chronyd logs when its NTP port is taken between our check and its bind.
_PORT_TAKEN = "Could not open NTP socket"


def start_chronyd(exe: str, d: Path, ports: Iterator[int], attempts: int = 5):
    """Start chronyd in `d` on the first of `ports` it can bind; returns `(proc, port)`.

    A port free when checked can be taken before chronyd binds it; chronyd then exits at once
    with `_PORT_TAKEN`, and the next port is tried.  Any other failure raises at once."""
    for attempt in range(1, attempts + 1):
        port = next(ports)
        (d / "chrony.conf").write_text(CHRONY_CONF.format(port=port, dir=d))
        log_path = d / "chronyd.log"
        with open(log_path, "wb") as log_file:
            # -d: stay in the foreground and log to stderr; -x: never touch the system clock.
            proc = subprocess.Popen(
                [exe, "-d", "-x", "-f", str(d / "chrony.conf")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 10.0
            while True:
                if proc.poll() is not None:
                    log = log_path.read_text()
                    if _PORT_TAKEN in log and attempt < attempts:
                        break  # try the next port
                    raise RuntimeError(f"chronyd exited with {proc.returncode}:\n{log}")
                try:
                    sntp_query("127.0.0.1", port, timeout_s=0.2)
                    return proc, port
                except NtpError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"chronyd did not answer on port {port} within 10 s ({e}):\n"
                            f"{log_path.read_text()}"
                        ) from None
        except BaseException:
            stop_chronyd(proc)
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def stop_chronyd(proc: subprocess.Popen) -> None:
    # chronyd -d does not fork, so the pid we started is the daemon's pid.
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def chronyd(tmp_path_factory: pytest.TempPathFactory):
    """A real chronyd serving NTP on 127.0.0.1:<free port>; yields `(host, port)`.

    Fails (does not skip) when chronyd is missing: these tests are the only check of the SNTP
    client against a real server, and a silent skip would hide that they never ran."""
    exe = chronyd_exe()
    if exe is None:
        pytest.fail(
            "chronyd is not installed; the SNTP tests need a real NTP server: "
            "apt-get install -y chrony",
            pytrace=False,
        )
    try:
        proc, port = start_chronyd(exe, tmp_path_factory.mktemp("chronyd"), unassigned_udp_ports())
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield "127.0.0.1", port
    finally:
        stop_chronyd(proc)


# --------------------------------------------------------------------------------------------
# A misbehaving NTP server of our own
# --------------------------------------------------------------------------------------------


class FakeNtpServer:
    """A UDP NTP server on 127.0.0.1 whose replies tests bend one attribute at a time.

    Attributes (change them at any time; the serving thread reads them per request):
    offset_s      added to the server's timestamps (its clock is this far ahead of ours)
    kiss          a 4-letter kiss code: reply with stratum 0 and this refid
    mode, version, stratum, leap   the reply header fields (version None echoes the request's)
    bad_originate the originate field does not echo the client's transmit timestamp
    zero_transmit the transmit timestamp is 0
    silent        never reply
    drop          ignore this many requests first, then reply
    `requests` counts the datagrams received; `transmits` lists the clients' transmit
    timestamps.  Use as a context manager.
    """

    def __init__(self, **behaviour: object) -> None:
        self.offset_s = 0.0
        self.kiss: str | None = None
        self.mode = 4
        self.version: int | None = None
        self.stratum = 2
        self.leap = 0
        self.bad_originate = False
        self.zero_transmit = False
        self.silent = False
        self.drop = 0
        for k, v in behaviour.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown behaviour {k!r}")
            setattr(self, k, v)
        self.requests = 0
        self.transmits: list[int] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # how often the thread notices stop()
        self.host, self.port = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-ntp", daemon=True)

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> FakeNtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(1024)
            except socket.timeout:
                continue
            t2 = time.time() + self.offset_s
            self.requests += 1
            if self.silent or len(data) < _PACKET.size:
                continue
            if self.drop > 0:
                self.drop -= 1
                continue
            req = _PACKET.unpack_from(data)
            client_tx = req[10]
            self.transmits.append(client_tx)
            version = self.version if self.version is not None else (req[0] >> 3) & 7
            if self.kiss is not None:
                leap, stratum, refid = 3, 0, self.kiss.encode("ascii")[:4].ljust(4, b"\0")
            else:
                leap, stratum, refid = self.leap, self.stratum, bytes([127, 0, 0, 1])
            t3 = time.time() + self.offset_s
            reply = _PACKET.pack(
                (leap << 6) | (version << 3) | self.mode,
                stratum,
                6,  # poll
                -20,  # precision, about 1 us
                int(0.001 * 65536),  # root delay 1 ms
                int(0.002 * 65536),  # root dispersion 2 ms
                refid,
                to_ntp(t2 - 10),  # reference timestamp
                client_tx ^ 0x5A5A if self.bad_originate else client_tx,
                to_ntp(t2),
                0 if self.zero_transmit else to_ntp(t3),
            )
            self._sock.sendto(reply, addr)

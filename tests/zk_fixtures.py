"""Real ZooKeeper servers for tests and benchmarks.

Design: a test that claims something about ZooKeeper talks to a real one.  `ZkServer` runs one
Debian-packaged ZooKeeper (`apt-get install zookeeper`) as a foreground JVM on loopback with
free ports and its own directory; `ZkEnsemble` runs several of them as one quorum.  Both are
plain classes so benchmarks and other test modules can use them without pytest; the fixtures
at the bottom are thin wrappers.  Readiness is asked of the server itself with the four-letter
words (`ruok` -> `imok`, then `srvr` until it reports a serving mode), polled against a deadline;
nothing here sleeps in the hope that a server is up.

A server can be stopped and started again on the same data directory (its port stays the same),
which is how outage tests take ZooKeeper away and bring it back.  Every server's output goes to
`<dir>/zookeeper.log`, and start failures quote its tail.

The JVM needs only `/usr/share/java/zookeeper.jar` on the class path: its manifest `Class-Path`
names the other jars of the Debian package (jute, netty transport/handler, slf4j-api, ...).
`slf4j-simple.jar` is added so the server logs at all (without a binding slf4j drops everything),
and `/etc/zookeeper/conf` only because the Debian scripts put it there.  Netty *server* mode
(`serverCnxnFactory=...NettyServerCnxnFactory`) would also need `netty-codec.jar` and
`netty-resolver.jar`; pass them as `extra_classpath` if you switch it on.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster_fixtures import free_ports  # one helper for all tests

try:
    import pytest
except ImportError:  # benchmarks use the classes without the [test] extra
    pytest = None

JAVA_DIR = Path("/usr/share/java")
ZOOKEEPER_JAR = JAVA_DIR / "zookeeper.jar"
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
INSTALL_HINT = (
    "ZooKeeper tests need Java and Debian's ZooKeeper: "
    "`sudo DEBIAN_FRONTEND=noninteractive apt-get install -y zookeeper`"
)

# Tests use a short tick: sessions may then be as short as 2 ticks (1 s), so an ephemeral znode of
# a killed process disappears in about a second and outage tests stay fast.
TEST_TICK_MS = 500

# Servers that are still running when the interpreter exits (a test crashed past its finaliser):
# kill them, because a leaked JVM keeps its ports and memory until someone notices.
_LIVE: set["ZkServer"] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


class ZkNotInstalled(RuntimeError):
    """Java or ZooKeeper is missing on this machine."""


class ZkStartError(RuntimeError):
    """A server did not become ready before its deadline (the message quotes its log)."""


def zk_classpath(extra: list[str] | None = None) -> str:
    """The class path for `QuorumPeerMain`; raises `ZkNotInstalled` with the install hint."""
    if shutil.which("java") is None:
        raise ZkNotInstalled(f"`java` is not on PATH. {INSTALL_HINT}")
    if not ZOOKEEPER_JAR.exists():
        raise ZkNotInstalled(f"{ZOOKEEPER_JAR} is missing. {INSTALL_HINT}")
    parts = ["/etc/zookeeper/conf", str(ZOOKEEPER_JAR)]
    simple = JAVA_DIR / "slf4j-simple.jar"
    if simple.exists():
        parts.append(str(simple))
    parts.extend(extra or [])
    return ":".join(parts)


def four_letter(port: int, command: str, *, timeout_s: float = 1.0) -> str:
    """Send a four-letter word to 127.0.0.1:`port` and return the whole answer.

    Blocks up to about `timeout_s`; raises `OSError` when nothing listens or the server is slow.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(command.encode("ascii"))
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class ZkServer:
    """One ZooKeeper server process (standalone, or one member of a `ZkEnsemble`).

    Not thread-safe; meant for the test's own thread.  `start()` blocks until the server serves
    (or raises `ZkStartError`), `stop()` blocks until the process is gone.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        *,
        tick_ms: int = TEST_TICK_MS,
        client_port: int | None = None,
        server_id: int | None = None,
        quorum: dict[int, tuple[int, int]] | None = None,
        extra_cfg: dict[str, str] | None = None,
        extra_classpath: list[str] | None = None,
    ):
        """`quorum` maps server id -> (peer port, election port) for every ensemble member;
        leave it None for a standalone server."""
        self.dir = Path(base_dir)
        self.data_dir = self.dir / "data"
        self.cfg_path = self.dir / "zoo.cfg"
        self.log_path = self.dir / "zookeeper.log"
        self.tick_ms = tick_ms
        self.client_port = client_port if client_port is not None else free_ports(1)[0]
        self.server_id = server_id
        self.quorum = quorum
        self.extra_cfg = dict(extra_cfg or {})
        self.extra_classpath = list(extra_classpath or [])
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._write_config()

    # --- configuration ----------------------------------------------------------------------

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "tickTime": str(self.tick_ms),
            "dataDir": str(self.data_dir),
            "clientPort": str(self.client_port),
            "clientPortAddress": "127.0.0.1",
            # The admin server wants port 8080 on every server; nothing here uses it.
            "admin.enableServer": "false",
            # Readiness and role checks use ruok/srvr/mntr.
            "4lw.commands.whitelist": "*",
            # Benchmarks open many connections from one address.
            "maxClientCnxns": "0",
        }
        if self.quorum:
            # In ticks: how long a follower may take to connect and sync, and how far it may lag.
            cfg["initLimit"] = "10"
            cfg["syncLimit"] = "5"
            for sid, (peer_port, election_port) in sorted(self.quorum.items()):
                cfg[f"server.{sid}"] = f"127.0.0.1:{peer_port}:{election_port}"
            (self.data_dir / "myid").write_text(f"{self.server_id}\n")
        cfg.update(self.extra_cfg)
        self.cfg_path.write_text("".join(f"{k}={v}\n" for k, v in cfg.items()))

    # --- life cycle -------------------------------------------------------------------------

    @property
    def hosts(self) -> str:
        """Connection string for kazoo (`127.0.0.1:PORT`)."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def spawn(self) -> None:
        """Start the JVM and return at once (use `wait_ready()` or `start()` to wait)."""
        if self.running:
            return
        cmd = [
            "java",
            # Small heap and the serial collector: several servers share a 2-core test machine.
            "-Xms32m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            zk_classpath(self.extra_classpath),
            MAIN_CLASS,
            str(self.cfg_path),
        ]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== start {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            # Its own process group: a Ctrl-C meant for pytest must not kill servers mid-test
            # (the finalisers stop them in order).
            start_new_session=True,
        )
        _LIVE.add(self)

    def start(self, timeout_s: float = 20.0) -> "ZkServer":
        """Start (or restart on the same data dir) and block until it serves clients."""
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def mode(self) -> str | None:
        """`standalone`, `leader`, `follower`, ... from `srvr`, or None while not serving."""
        try:
            answer = four_letter(self.client_port, "srvr", timeout_s=0.5)
        except OSError:
            return None
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def ruok(self) -> bool:
        try:
            return four_letter(self.client_port, "ruok", timeout_s=0.5) == "imok"
        except OSError:
            return False

    def serving(self) -> bool:
        """True once the server answers `imok` and reports a serving mode (it is in a quorum)."""
        return self.ruok() and self.mode() in ("standalone", "leader", "follower", "observer")

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise ZkStartError(
                    f"ZooKeeper on port {self.client_port} exited with {self.proc.returncode}"
                    f" (log {self.log_path}):\n{self.log_tail()}"
                )
            if self.serving():
                return
            time.sleep(0.05)  # polling interval, not synchronisation: the deadline decides
        raise ZkStartError(
            f"ZooKeeper on port {self.client_port} not serving after {timeout_s} s"
            f" (log {self.log_path}):\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; blocks until the process is reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reaped()

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown), blocks until reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reaped()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        assert self.running, "pause() of a server that is not running"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.running, "resume() of a server that is not running"
        self.proc.send_signal(signal.SIGCONT)

    def _reaped(self) -> None:
        _LIVE.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ZkServer({self.hosts}, id={self.server_id}, {state})"


class ZkEnsemble:
    """`n` ZooKeeper servers forming one quorum on loopback.

    `start()` blocks until every server serves and exactly one is leader.  Individual servers
    can be killed and restarted through `.servers`.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        n: int = 3,
        *,
        tick_ms: int = TEST_TICK_MS,
        extra_cfg: dict[str, str] | None = None,
        extra_classpath: list[str] | None = None,
    ):
        if n < 2:
            raise ValueError("an ensemble needs n >= 2; use ZkServer for a standalone server")
        ports = free_ports(3 * n)
        quorum = {sid: (ports[n + sid - 1], ports[2 * n + sid - 1]) for sid in range(1, n + 1)}
        self.servers = [
            ZkServer(
                Path(base_dir) / f"zk{sid}",
                tick_ms=tick_ms,
                client_port=ports[sid - 1],
                server_id=sid,
                quorum=quorum,
                extra_cfg=extra_cfg,
                extra_classpath=extra_classpath,
            )
            for sid in range(1, n + 1)
        ]

    @property
    def hosts(self) -> str:
        """Connection string naming every member (kazoo picks one and fails over)."""
        return ",".join(s.hosts for s in self.servers)

    def start(self, timeout_s: float = 30.0) -> "ZkEnsemble":
        # Spawn all JVMs first: a member cannot serve until a quorum of them is up.
        for s in self.servers:
            s.spawn()
        self.wait_quorum(timeout_s, expect=len(self.servers))
        return self

    def wait_quorum(self, timeout_s: float = 30.0, *, expect: int | None = None) -> ZkServer:
        """Block until `expect` running servers (default: all running ones) serve with exactly
        one leader among them; return the leader."""
        deadline = time.monotonic() + timeout_s
        modes: dict[int, str | None] = {}
        while time.monotonic() < deadline:
            running = [s for s in self.servers if s.running]
            want = expect if expect is not None else len(running)
            modes = {s.server_id: s.mode() for s in running}
            serving = [sid for sid, m in modes.items() if m in ("leader", "follower")]
            leaders = [sid for sid, m in modes.items() if m == "leader"]
            if len(serving) >= want and len(leaders) == 1:
                return self.servers[leaders[0] - 1]
            time.sleep(0.05)  # polling interval; the deadline decides
        logs = "\n".join(
            f"--- zk{s.server_id} ({s.log_path}):\n{s.log_tail(15)}" for s in self.servers
        )
        raise ZkStartError(f"no quorum after {timeout_s} s, modes {modes}\n{logs}")

    def leader(self) -> ZkServer | None:
        for s in self.servers:
            if s.running and s.mode() == "leader":
                return s
        return None

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


# --- pytest fixtures (thin wrappers) ------------------------------------------------------------
#
# Import them into a test module (`from zk_fixtures import zk_standalone`) or list the module in
# a conftest's `pytest_plugins`.


def _require_zookeeper() -> None:
    """Fail (not skip) when ZooKeeper is missing: a silently skipped suite proves nothing."""
    try:
        zk_classpath()
    except ZkNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)


if pytest is not None:

    @pytest.fixture(scope="module")
    def zk_standalone(tmp_path_factory):
        """One standalone server shared by a test module.  Tests must not stop it (make their own
        `ZkServer` for outage tests) and should use their own cluster names to stay independent."""
        _require_zookeeper()
        server = ZkServer(tmp_path_factory.mktemp("zk-standalone"))
        try:
            server.start()
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def zk_server(tmp_path):
        """A standalone server of the test's own, which the test may stop, kill and restart."""
        _require_zookeeper()
        server = ZkServer(tmp_path / "zk")
        try:
            server.start()
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def zk_ensemble(tmp_path):
        """A 3-server ensemble of the test's own (function scope: tests kill members)."""
        _require_zookeeper()
        ensemble = ZkEnsemble(tmp_path / "ensemble", n=3)
        try:
            ensemble.start()
            yield ensemble
        finally:
            ensemble.stop()

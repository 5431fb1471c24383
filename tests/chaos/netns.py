"""Several hosts on one machine: one network namespace per node, joined by a bridge.

Design.  Node i lives in namespace `<tag>n<i>` with one interface (`eth0`, the far end of a veth
pair) holding `10.213.X.(10+i)/24`; the near ends hang on a bridge `<tag>b` in the root namespace
that holds `10.213.X.1/24`, so the test process (clients, checkers) reaches every node directly
and nodes reach each other through the bridge.  X is picked so the /24 overlaps nothing the root
namespace routes already.  `tag` is `rpch<pid><letter>`: every name this module creates carries
the creating process's id, so leftovers of a crashed run can be told from anything else and
swept (`sweep_stale`) without touching what belongs to a live process.

Faults (all reversible, all inside what this module made):
* `block(dst, src)` — node `dst` drops every packet from node `src` (`iptables -A INPUT -s`
  inside dst's namespace): a one-way, per-peer partition.  Both directions give a full cut.
* `link_down(i)` / `link_up(i)` — the node's veth goes down: it is cut from everyone, clients
  included.
* `heal()` — flush every namespace's INPUT chain and bring every link up.

Only addresses inside the namespaces made here are ever targeted.  `close()` deletes everything
(idempotent); it runs on the owner's teardown and, as a last resort, at interpreter exit.
Needs root, `ip` (iproute2) and `iptables`.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import subprocess
import threading

PREFIX = "rpch"
_LIVE: set["NetnsNet"] = set()
_LOCK = threading.Lock()
_counter = 0


def available() -> str | None:
    """None if namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_stale() -> list[str]:
    """Delete namespaces and links named by this module for processes that no longer exist.
    Returns what was removed."""
    removed = []
    pat = re.compile(rf"^{PREFIX}(\d+)[a-z]")
    links = _run("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = []
    for line in _run("ip", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        try:
            if word != "default":
                out.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            pass
    for line in _run("ip", "-4", "-o", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            out.append(ipaddress.ip_interface(m.group(1)).network)
    return out


class NetnsNet:
    """`n` namespaces on one bridge.  `up()` builds it; `close()` removes it."""

    def __init__(self, n: int):
        global _counter
        with _LOCK:
            letter = "abcdefghijklmnopqrstuvwxyz"[_counter % 26]
            _counter += 1
        self.n = n
        self.tag = f"{PREFIX}{os.getpid()}{letter}"
        self.bridge = f"{self.tag}b"
        self.subnet: ipaddress.IPv4Network | None = None
        self._made: list[tuple[str, str]] = []  # ("link"|"netns", name), in creation order
        self.blocked: set[tuple[int, int]] = set()  # (dst, src)
        self.down: set[int] = set()

    # --- names and addresses ----------------------------------------------------------------

    def ns(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def veth(self, i: int) -> str:
        return f"{self.tag}v{i}"

    def addr(self, i: int) -> str:
        return str(self.subnet.network_address + 10 + i)

    @property
    def host_addr(self) -> str:
        return str(self.subnet.network_address + 1)

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i)]

    # --- building -----------------------------------------------------------------------------

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        start = os.getpid() % 200
        for k in range(250):
            net = ipaddress.ip_network(f"10.213.{(start + k) % 250 + 1}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.213.X.0/24 for the test network")

    def up(self) -> "NetnsNet":
        with _LOCK:
            _LIVE.add(self)
        try:
            self.subnet = self._pick_subnet()
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _run("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(1, self.n + 1):
                ns, veth, peer = self.ns(i), self.veth(i), f"{self.tag}p{i}"
                _run("ip", "netns", "add", ns)
                self._made.append(("netns", ns))
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
                self._made.append(("link", veth))
                _run("ip", "link", "set", peer, "netns", ns)
                _run("ip", "link", "set", veth, "master", self.bridge)
                _run("ip", "link", "set", veth, "up")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", peer, "name", "eth0")
                _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(i)}/24",
                     "dev", "eth0")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove everything made here, newest first.  Idempotent; never raises."""
        for kind, name in reversed(self._made):
            if kind == "link":
                _run("ip", "link", "del", name, check=False)
            else:
                _run("ip", "netns", "del", name, check=False)
        self._made.clear()
        with _LOCK:
            _LIVE.discard(self)

    # --- faults -------------------------------------------------------------------------------

    def block(self, dst: int, src: int) -> None:
        """Node `dst` stops receiving anything from node `src` (one way)."""
        if (dst, src) in self.blocked:
            return
        _run(*self.exec_prefix(dst), "iptables", "-A", "INPUT", "-s", self.addr(src), "-j",
             "DROP")
        self.blocked.add((dst, src))

    def cut(self, a: int, b: int) -> None:
        self.block(a, b)
        self.block(b, a)

    def link_down(self, i: int) -> None:
        _run("ip", "link", "set", self.veth(i), "down")
        self.down.add(i)

    def link_up(self, i: int) -> None:
        _run("ip", "link", "set", self.veth(i), "up")
        self.down.discard(i)

    def heal(self) -> None:
        for dst in sorted({d for d, _ in self.blocked}):
            _run(*self.exec_prefix(dst), "iptables", "-F", "INPUT", check=False)
        self.blocked.clear()
        for i in sorted(self.down):
            _run("ip", "link", "set", self.veth(i), "up", check=False)
        self.down.clear()


@atexit.register
def _close_leftovers() -> None:
    for net in list(_LIVE):
        net.close()

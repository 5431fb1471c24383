"""A fault-injecting TCP proxy between Raft nodes on loopback (the kernel here has no netem).

Design.  PySyncObj keeps one TCP connection per pair of nodes, opened by the node whose own
address sorts higher (`TCPTransport._shouldConnect`), and the connecting node introduces
itself by sending its own address as the first message.  To put a proxy on every pair while
the nodes stay on loopback, each node is told its peers' Raft addresses as *proxy* ports
(`ports_for` picks them so exactly one side of every pair connects, as without a proxy), and
the proxy rewrites that first message to the name the accepting node knows the connecting one
by.  That needs node-to-node traffic without encryption (no cluster secret), which the config
allows on loopback.  Frames are raftpay's (`node._RaftpayConnection`): a 4-byte native-endian
length, then a type byte, the sender's cluster id (8 bytes) and pickle(message); only the
first frame is ever opened, and only to read a string.

Everything else is forwarded frame by frame, so faults act on whole Raft messages, per
direction of each pair (`set_link(src, dst, ...)`):
* `delay_ms` + `jitter_ms` — each message waits; order within a direction is kept (TCP).
* `drop_p` — each message is lost with this probability (the stream stays in step).
* `dup_p` — each message is delivered twice with this probability.
* `blackhole` — every message is lost (a one-way partition; PySyncObj's read timeout then
  closes the connection and the reconnect is blackholed too).
`reset(src, dst)` closes the pair's live connections.  `clear()` removes every fault.

Runs in its own thread with its own asyncio loop; the public methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import random
import struct
import threading
import time
from dataclasses import dataclass

import pysyncobj.pickle as pso_pickle

from raftpay.node import _FRAME_PLAIN

HEADER = struct.Struct("i")  # PySyncObj's own framing (tcp_connection.py)
MAX_FRAME = 64 * 1024 * 1024


@dataclass
class LinkFaults:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    drop_p: float = 0.0
    dup_p: float = 0.0
    blackhole: bool = False

    def active(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.drop_p or self.dup_p
                    or self.blackhole)


class _StrOnly(pickle.Unpickler):
    def find_class(self, module, name):  # the address message is a plain str
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def ports_for(base: int, n: int) -> dict:
    """Port plan for `n` nodes: node i (1-based) binds `raft[i]` and serves clients on
    `client[i]`; node i knows peer j at `name[i][j]`, just below its own port when j < i and
    just above when j > i.  So of every pair only the higher-numbered node connects (its own
    address sorts above the name it knows the other by, and the other's does not), to the proxy
    listening at `name[i][j]`, which forwards to `raft[j]` and rewrites i's introduction to
    `name[j][i]`, the name j knows i by.  All ports have five digits, so string order is numeric
    order."""
    raft = {i: base + 100 * i for i in range(1, n + 1)}
    client = {i: base + 100 * i + 50 for i in range(1, n + 1)}
    name = {i: {j: raft[i] + (j - i) for j in range(1, n + 1) if j != i}
            for i in range(1, n + 1)}
    assert 10000 <= base + 100 - n and base + 100 * n + 50 <= 65535
    return {"raft": raft, "client": client, "name": name}


class FaultProxy:
    def __init__(self, host: str = "127.0.0.1", seed: int = 0):
        self.host = host
        self.rng = random.Random(seed)
        self.links: dict[tuple[int, int], LinkFaults] = {}
        self.stats = {"frames": 0, "dropped": 0, "duplicated": 0, "delayed": 0, "resets": 0}
        self._pairs: list[tuple[int, int, int, int, bytes, bytes]] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: dict[tuple[int, int], set] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # --- set-up -------------------------------------------------------------------------------

    def add_pair(self, initiator: int, acceptor: int, listen_port: int, target_port: int,
                 intro_from: str, intro_to: str) -> None:
        """Forward `listen_port` -> `target_port` for the pair; the initiator introduces itself
        as `intro_from`, which the acceptor knows as `intro_to`.  Before `start()`."""
        self._pairs.append((initiator, acceptor, listen_port, target_port, intro_from, intro_to))

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._main, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("fault proxy did not start")
        if self._error:
            raise self._error

    _error: BaseException | None = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as e:  # report to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        for ini, acc, lport, tport, intro_from, intro_to in self._pairs:
            self._conns[(ini, acc)] = set()

            async def handle(reader, writer, ini=ini, acc=acc, tport=tport, f=intro_from,
                             t=intro_to):
                await self._serve(reader, writer, ini, acc, tport, f, t)

            srv = await asyncio.start_server(handle, self.host, lport, reuse_address=True)
            self._servers.append(srv)

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def shut():
            for s in self._servers:
                s.close()
            for conns in self._conns.values():
                for w in list(conns):
                    w.close()

        fut = asyncio.run_coroutine_threadsafe(shut(), loop)
        try:
            fut.result(5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)

    # --- faults (any thread) ------------------------------------------------------------------

    def set_link(self, src: int, dst: int, **faults) -> None:
        self.links[(src, dst)] = LinkFaults(**faults)

    def clear(self) -> None:
        self.links = {}

    def reset(self, a: int, b: int) -> None:
        """Close the live connections between a and b (they reconnect by themselves)."""
        key = (a, b) if (a, b) in self._conns else (b, a)

        def close():
            for w in list(self._conns.get(key, ())):
                w.close()
            self.stats["resets"] += 1

        if self._loop is not None:
            self._loop.call_soon_threadsafe(close)

    # --- forwarding ---------------------------------------------------------------------------

    async def _serve(self, reader, writer, ini, acc, tport, intro_from, intro_to) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, tport)
        except OSError:
            writer.close()
            return
        conns = self._conns[(ini, acc)]
        conns.update((writer, up_writer))
        tasks = [asyncio.ensure_future(self._pump(reader, up_writer, ini, acc,
                                                  (intro_from, intro_to))),
                 asyncio.ensure_future(self._pump(up_reader, writer, acc, ini, None))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in (writer, up_writer):
                w.close()
                conns.discard(w)

    async def _pump(self, reader, writer, src, dst, intro) -> None:
        """Frames from reader to writer with the (src -> dst) faults; returns when either side
        closes."""
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        last_due = 0.0
        first = True
        try:
            while True:
                head = await reader.readexactly(HEADER.size)
                (n,) = HEADER.unpack(head)
                if not 0 <= n <= MAX_FRAME:
                    return
                body = await reader.readexactly(n)
                if first and intro is not None:
                    first = False
                    body = _rewrite_intro(body, *intro)
                    queue.put_nowait((0.0, HEADER.pack(len(body)) + body))
                    continue
                first = False
                self.stats["frames"] += 1
                lf = self.links.get((src, dst))
                frame = head + body
                if lf is None or not lf.active():
                    queue.put_nowait((last_due, frame))
                    continue
                if lf.blackhole or (lf.drop_p and self.rng.random() < lf.drop_p):
                    self.stats["dropped"] += 1
                    continue
                due = time.monotonic() + (lf.delay_ms + self.rng.random() * lf.jitter_ms) / 1000
                due = max(due, last_due)  # keep the stream's order
                if due > time.monotonic():
                    self.stats["delayed"] += 1
                last_due = due
                queue.put_nowait((due, frame))
                if lf.dup_p and self.rng.random() < lf.dup_p:
                    self.stats["duplicated"] += 1
                    queue.put_nowait((due, frame))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            queue.put_nowait(None)
            try:
                await asyncio.wait_for(sender, 5)
            except (asyncio.TimeoutError, Exception):
                sender.cancel()

    @staticmethod
    async def _send(queue: asyncio.Queue, writer) -> None:
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                due, frame = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(frame)
                await writer.drain()
        except (ConnectionError, OSError):
            return


def _rewrite_intro(body: bytes, intro_from: str, intro_to: str) -> bytes:
    """The connecting node's first message is its own address; replace it by the name the
    accepting node knows it by.  Anything else passes unchanged."""
    if body[:1] != _FRAME_PLAIN:
        return body
    try:
        msg = _StrOnly(io.BytesIO(body[9:])).load()  # after the type byte and the cluster
    except Exception:
        return body
    if msg != intro_from:
        return body
    return body[:9] + pso_pickle.dumps(intro_to)

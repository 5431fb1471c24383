"""The client-facing server on every node (asyncio).

Design (rqlite `http/service.go` is the model).  Each connection is an asyncio protocol
(`_Conn`) that splits what arrives into frames (`wire.FrameBuffer`), decodes and checks them
(`wire`), and answers each request as soon as it can — requests on one connection are handled
concurrently and replies carry the request id, so a client may pipeline.  No task, timer or
future is made per write request: the hot path is callbacks only, and one sweeper task enforces
the idle and half-frame timeouts for every connection.

Writes (`submit`, `register_session`, `keep_alive`) go only through the leader.  The leader does
not propose one Raft entry per request: requests that arrive while entries are in flight wait in
`_Batcher` and go out together as the next entry (group commit), bounded by `max_entry_bytes`.
So load turns into larger entries, not more of them, and a lone request still goes out at once.
The leader stamps each entry with its hybrid logical clock, proposes it, and replies only after
the node has applied it (`Node.propose` calls back after apply) — a reply never precedes the
apply.  If leadership changes with the entry in flight the reply is `outcome_unknown`: the client
retries with the same ids and the ledger's idempotency makes that safe.

A follower answers writes with `not_leader` and the leader's *client* address (or `no_leader`
when it knows none); it never forwards, so a client always talks to the node that decides.

Reads are linearizable by default: the leader confirms it still leads with a majority round
(`Node.read_index`, shared by all reads that arrive while one is in flight) and waits until it
has applied that far before it looks.  `consistency="follower"` reads are served by any node once
it has applied at least `min_version` (read-your-writes with the version a write returned), or
answered `read_not_ready` after a timeout.

Threads: the asyncio loop owns this module.  A node started with `start(loop=...)` (what `serve`
does) ticks on the same loop, so its callbacks arrive on the loop thread and are queued with
`call_soon`; a node with its own Raft thread gets `call_soon_threadsafe` instead.  A bad request
gets an error reply; a broken connection is closed; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from typing import Any, Callable

import msgpack

from . import wire
from .codes import Code, ProtocolError
from .ledger import events_as_rows
from .node import PeerComplaints

log = logging.getLogger("raftpay.server")

#: Propose a no-op `tick` when the leader has proposed nothing for this long, so pending-transfer
#: timeouts and session TTLs advance on an idle ledger.
IDLE_TICK_S = 1.0


#: File descriptors a node keeps beside its client connections: its own (Raft peers, the
#: journal and snapshot files, its log, a ZooKeeper session, modules loaded late), the
#: connections over the cap waiting for their answer (SHED_MAX), and the accepts not looked
#: at yet (asyncio accepts up to 100 a loop pass, and closes a refused one a pass or two
#: later: 1,500 connections at once took ~300 descriptors beyond the cap).
FD_RESERVE = 512

#: A connection over `max_connections` has its requests answered `overloaded` and is closed,
#: or closed after this long if it sends none.  At most SHED_MAX such wait at once; past that
#: a connection is closed as soon as it is accepted: 600 connections opened in 2 s against a
#: node allowed 300 descriptors held them all for their second, and its meta file could not
#: be written (EMFILE).
OVER_CAP_GRACE_S = 1.0
SHED_MAX = 64


def connection_cap(configured: int, soft_limit: int | None = None) -> int:
    """`max_connections`, lowered to what the file descriptor limit (`ulimit -n`) leaves beside
    FD_RESERVE.  Without a cap, clients that opened as many connections as the limit allows
    (a pool that leaks them, say) took every descriptor: the node could not open a snapshot or
    load a module, its Raft tick failed with EMFILE, and asyncio logged every refused accept
    (11,814 lines in 3 s, scratch: a leader at `ulimit -n 150` and 232 idle connections)."""
    soft = soft_limit
    if soft is None:
        try:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):
            return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


class _OncePerMinute(logging.Filter):
    """asyncio logs each accept that fails for want of descriptors, with a traceback, about a
    hundred a second while it lasts: let one through a minute, with a count of the rest
    (`PeerComplaints`' bookkeeping)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self._said = PeerComplaints(log)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in str(record.msg):
            return True
        more = self._said.due(self.text)
        if more is None:
            return False
        record.msg = f"{record.msg}{more}"
        return True


logging.getLogger("asyncio").addFilter(_OncePerMinute("out of system resource"))


_WRITE_TYPES = frozenset({"submit", "register_session", "keep_alive"})
_READ_TYPES = frozenset({"lookup_accounts", "lookup_transfers", "account_transfers"})


class ServerSettings:
    """The knobs the server reads (from `config.ServerConfig` and `config.RaftConfig`)."""

    def __init__(self, *, max_frame_bytes: int = wire.MAX_FRAME_BYTES,
                 request_timeout_ms: int = 5000, max_inflight_requests: int = 10_000,
                 idle_timeout_ms: int = 300_000, frame_timeout_ms: int = 10_000,
                 max_entry_bytes: int = 4 * 1024 * 1024, max_inflight_entries: int = 1,
                 follower_read_timeout_ms: int = 1000, max_connections: int = 10_000):
        self.max_frame_bytes = max_frame_bytes
        self.request_timeout_s = request_timeout_ms / 1000
        self.max_inflight_requests = max_inflight_requests
        self.idle_timeout_s = idle_timeout_ms / 1000
        self.frame_timeout_s = frame_timeout_ms / 1000
        self.max_entry_bytes = max_entry_bytes
        #: Writes waiting for the next entry beyond this many bytes are refused `overloaded`
        #: (`Server._overloaded`): one entry's worth, so what is admitted goes out with the
        #: entry after the one in flight.
        self.max_queued_bytes = max_entry_bytes
        self.max_inflight_entries = max_inflight_entries
        self.follower_read_timeout_s = follower_read_timeout_ms / 1000
        self.max_connections = max_connections

    @classmethod
    def from_config(cls, cfg) -> "ServerSettings":
        s, r = cfg.server, cfg.raft
        return cls(max_frame_bytes=s.max_frame_bytes, request_timeout_ms=s.request_timeout_ms,
                   max_inflight_requests=s.max_inflight_requests,
                   idle_timeout_ms=s.idle_timeout_ms, frame_timeout_ms=s.frame_timeout_ms,
                   max_entry_bytes=r.max_entry_bytes, max_connections=s.max_connections)


class Server:
    """Serves one node's client port.

    `node` is a `raftpay.node.Node`; `stamp()` returns the next HLC timestamp (leader side);
    `client_addr_of(node_id)` maps a Raft node id to its client address for redirects;
    `extra_status()` adds fields (clock, mirror) to `status` replies.
    """

    def __init__(self, node, *, stamp: Callable[[], int],
                 client_addr_of: Callable[[str], str | None],
                 settings: ServerSettings | None = None,
                 extra_status: Callable[[], dict] | None = None,
                 wall_ms: Callable[[], int] | None = None):
        self.node = node
        self.wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.stamp = stamp
        self.client_addr_of = client_addr_of
        self.settings = settings or ServerSettings()
        self.extra_status = extra_status or (lambda: {})
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        self._batcher: _Batcher | None = None
        self._reads: _ReadBarrier | None = None
        self._conns: set[_Conn] = set()
        self._shed: set[_Conn] = set()  # over the cap: answered `overloaded`, then closed
        self._complain = PeerComplaints(log).warn
        self.max_connections = self.settings.max_connections  # lowered by `start`
        # While corked (depth > 0), replies collect per connection and go out in one write per
        # connection when the outermost uncork runs (`corked`).
        self._cork_depth = 0
        self._corked: list[_Conn] = []
        self._ticker: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.address: tuple[str, int] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0 picks a free one); returns the bound address."""
        self._loop = asyncio.get_running_loop()
        # Node callbacks come back to the loop through this (see the module docstring).
        self.to_loop = (self._loop.call_soon if self.node.runs_on(self._loop)
                        else self._loop.call_soon_threadsafe)
        self._batcher = _Batcher(self)
        self._reads = _ReadBarrier(self)
        self.max_connections = connection_cap(self.settings.max_connections)
        if self.max_connections < self.settings.max_connections:
            log.info("this node takes at most %d client connections, not server."
                     "max_connections = %d: its file descriptor limit (ulimit -n) leaves no "
                     "more beside the %d it keeps for itself; raise the limit to take more",
                     self.max_connections, self.settings.max_connections, FD_RESERVE)
        self._server = await self._loop.create_server(lambda: _Conn(self), host, port,
                                                      reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]
        self._ticker = asyncio.create_task(self._tick_when_idle())
        self._sweeper = asyncio.create_task(self._sweep())
        return self.address

    async def stop(self) -> None:
        for task in (self._ticker, self._sweeper):
            if task:
                task.cancel()
        if self._server:
            self._server.close()
        for conn in list(self._conns) + list(self._shed):
            conn.close()
        if self._server:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except (asyncio.TimeoutError, TimeoutError):
                pass

    # --- connections ------------------------------------------------------------------------

    def _at_cap(self) -> None:
        """A connection came with `max_connections` open: say so, once a minute."""
        self._complain("cap", (
            f"{len(self._conns)} client connections open, the most this node takes "
            f"(server.max_connections, or what ulimit -n leaves): new ones are answered "
            f"`overloaded` and closed. Idle connections a client keeps open (a pool that "
            f"leaks them?) or more clients than that"))

    async def _sweep(self) -> None:
        """Close connections idle for `idle_timeout` (no frame, nothing in flight), and answer and
        close those that started a frame and did not finish it within `frame_timeout` — a peer
        that sends half a frame and stalls must not hold a buffer forever."""
        s = self.settings
        period = max(0.05, min(1.0, s.frame_timeout_s / 3, s.idle_timeout_s / 3))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self._conns):
                if conn.frames.partial:
                    if now - conn.frame_since > s.frame_timeout_s:
                        self._send(conn, wire.reply(0, Code.INVALID_REQUEST, message=(
                            f"frame not completed within {s.frame_timeout_s} s")))
                        conn.close()
                elif conn.pending == 0 and now - conn.last_active > s.idle_timeout_s:
                    conn.close()  # idle connection: let it go

    def _cork(self) -> None:
        self._cork_depth += 1

    def _uncork(self) -> None:
        self._cork_depth -= 1
        if not self._cork_depth and self._corked:
            conns, self._corked = self._corked, []
            for conn in conns:
                conn.flush()

    def _send(self, writer: "_Conn", frame: bytes) -> None:
        if not writer.is_closing():
            writer.write(frame)

    def _reply(self, writer, rid: int, code: int, **fields: Any) -> None:
        try:
            frame = wire.encode(wire.REPLY, rid, {"code": int(code), **fields},
                                self.settings.max_frame_bytes)
        except Exception as e:  # a reply too large to send is an honest error, not a crash
            frame = wire.reply(rid, Code.INTERNAL_ERROR, message=f"reply not sent: {e}")
        self._send(writer, frame)

    def _dispatch(self, payload: bytes, writer: "_Conn") -> None:
        if (self._batcher.queued_bytes + len(payload) > self.settings.max_queued_bytes
                and self._overloaded(payload, writer)):
            return
        try:
            env = wire.decode(payload, self.settings.max_frame_bytes)
            wire.validate_request(env)
        except wire.WireError as e:
            self._reply(writer, e.request_id or 0, e.code, message=str(e))
            return
        if self._inflight >= self.settings.max_inflight_requests:
            self._reply(writer, env.id, Code.OVERLOADED, message="too many requests in flight")
            return
        self._inflight += 1
        writer.pending += 1
        if env.type in _WRITE_TYPES:
            # The hot path: no task, no per-request timer; the batcher resolves the future and
            # the done-callback writes the reply.
            try:
                self._write(env.type, env.body, env.id, writer, len(payload))
            except Exception as e:
                self._inflight -= 1
                writer.pending -= 1
                log.exception("write %s failed", env.type)
                self._reply(writer, env.id, Code.INTERNAL_ERROR, message=repr(e))
            return
        task = asyncio.ensure_future(self._handle(env, writer))
        task.add_done_callback(lambda t: self._done(t, writer))

    def _overloaded(self, payload: bytes, writer: "_Conn") -> bool:
        """Refuse a write while the writes waiting for the next entry would pass
        `max_queued_bytes`; True if refused.  Admitted regardless, such writes waited behind
        each other for as long as the log took to take them: clients of 8k-event batches, 128
        at once, saw half their requests end `outcome unknown` after 10 s (scratch,
        2026-12-05), though most had not been proposed yet, and the leader held them all.
        `overloaded` says that nothing happened, and the client backs off and retries.
        Refused before its body is decoded."""
        if not self._batcher.queue:
            return False  # an idle leader admits any one request
        head = wire.peek(payload)
        if head is None or head[0] not in _WRITE_TYPES:
            return False  # decoded as usual
        self._reply(writer, head[1], Code.OVERLOADED, message=(
            f"{self._batcher.queued_bytes} bytes of writes wait for the log; nothing was "
            f"applied, retry shortly"))
        return True

    def _done(self, task: asyncio.Task, writer: "_Conn") -> None:
        self._inflight -= 1
        writer.pending -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())

    async def _handle(self, env: wire.Envelope, writer) -> None:
        kind, body, rid = env.type, env.body, env.id
        try:
            if kind == "ping":
                # Peers sample our clock with it (SNTP-style): the reply carries our wall ms.
                self._reply(writer, rid, Code.OK, node=self.node.node_id,
                            role="leader" if self.node.is_leader() else "follower",
                            wall_ms=self.wall_ms())
            elif kind == "status":
                st = dict(self.node.status())
                st.update(self.extra_status())
                st["leader_client_addr"] = self._leader_hint()
                if body.get("state_hash"):
                    st["state_hash"] = self.node.state_hash()
                self._reply(writer, rid, Code.OK, status=st)
            elif kind in _READ_TYPES:
                await self._read(kind, body, rid, writer)
            else:  # validate_request knows the types; this is a guard for a new one
                self._reply(writer, rid, Code.INVALID_REQUEST, message=f"unhandled {kind!r}")
        except Exception as e:
            log.exception("request %s failed", kind)
            self._reply(writer, rid, Code.INTERNAL_ERROR, message=repr(e))

    def _leader_hint(self) -> str | None:
        leader = self.node.leader_id
        return self.client_addr_of(leader) if leader else None

    def _not_leader(self, writer, rid: int) -> None:
        hint = self._leader_hint()
        if hint and self.node.leader_id != self.node.node_id:
            self._reply(writer, rid, Code.NOT_LEADER, leader=hint)
        else:
            self._reply(writer, rid, Code.NO_LEADER, message="no leader known; retry shortly")

    # --- writes -----------------------------------------------------------------------------

    def _write(self, kind: str, body: dict, rid: int, writer, size: int) -> None:
        """Queue a write for the next entry; the reply is written when it is applied (or when
        the entry's deadline passes: timeout, outcome unknown).  `size`: the request's bytes,
        which bound what it adds to the entry.  Loop thread; never blocks."""
        if not self.node.is_leader():
            self._inflight -= 1
            writer.pending -= 1
            self._not_leader(writer, rid)
            return
        if kind == "submit":
            events = body.get("events")
            if events is None:  # sent compact (its shape checked by `wire`): it stays so
                command = {"type": "submit", "keys": body["keys"], "rows": body["rows"]}
            else:
                compact = (events_as_rows(events) if len(events) >= wire.ROWS_MIN_EVENTS
                           else None)
                if compact is None:
                    command = {"type": "submit", "events": events}
                else:  # the same events, in the form that replicas unpack ~5x faster
                    command = {"type": "submit", "keys": compact[0], "rows": compact[1]}
            for k in ("session", "seq", "ack"):
                if k in body:
                    command[k] = body[k]
        elif kind == "register_session":
            command = {"type": "register_session"}
        else:
            command = {"type": "keep_alive", "session": body["session"]}
        self._batcher.add(command, rid, writer, size)

    def _write_done(self, code: int, reply: dict | None, index: int, rid: int, writer) -> None:
        self._inflight -= 1
        writer.pending -= 1
        if code == Code.TIMEOUT:
            self._reply(writer, rid, Code.TIMEOUT,
                        message="no commit within the request timeout; the outcome is unknown")
            return
        if code != Code.OK:
            if code == Code.NOT_LEADER or code == Code.NO_LEADER:
                self._not_leader(writer, rid)
            else:
                self._reply(writer, rid, code)
            return
        fields = {k: v for k, v in reply.items() if k != "code"}
        self._reply(writer, rid, reply["code"], version=index, **fields)

    async def _tick_when_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_TICK_S / 2)
            b = self._batcher
            if (self.node.is_leader() and not b.queue and not b.inflight
                    and time.monotonic() - b.last_propose >= IDLE_TICK_S):
                b.add({"type": "tick"}, 0, None, 16)

    # --- reads ------------------------------------------------------------------------------

    async def _read(self, kind: str, body: dict, rid: int, writer) -> None:
        consistency = body.get("consistency", "linearizable")
        loop = self._loop
        if consistency == "linearizable":
            if not self.node.is_leader():
                self._not_leader(writer, rid)
                return
            try:
                code, index = await asyncio.wait_for(self._reads.wait(),
                                                     self.settings.request_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                self._reply(writer, rid, Code.TIMEOUT, message="leadership not confirmed in time")
                return
            if code != Code.OK:
                self._not_leader(writer, rid) if code in (Code.NOT_LEADER, Code.NO_LEADER) \
                    else self._reply(writer, rid, code)
                return
        else:
            want = body.get("min_version", 0)
            fut = loop.create_future()
            self.node.wait_applied(want, self.settings.follower_read_timeout_s,
                                   _resolver(self.to_loop, fut))
            code, index = await fut
            if code != Code.OK:
                self._reply(writer, rid, code, applied=index,
                            message=f"applied {index} < asked version {want}; retry")
                return
        if kind == "lookup_accounts":
            out = self.node.query(lambda led: led.lookup_accounts(body["ids"]))
            self._reply(writer, rid, Code.OK, accounts=out, version=index)
        elif kind == "lookup_transfers":
            out = self.node.query(lambda led: led.lookup_transfers(body["ids"]))
            self._reply(writer, rid, Code.OK, transfers=out, version=index)
        else:
            items, cursor = self.node.query(lambda led: led.account_transfers(
                body["account"], body.get("limit", 100), body.get("cursor", 0)))
            self._reply(writer, rid, Code.OK, transfers=items, next_cursor=cursor, version=index)


def _resolver(to_loop: Callable, fut: asyncio.Future) -> Callable:
    """A node callback that resolves `fut` in the loop with its arguments (`to_loop` is the
    server's `call_soon` or `call_soon_threadsafe`)."""

    def resolve(*args):
        def set_result():
            if not fut.done():
                fut.set_result(args)

        to_loop(set_result)

    return resolve


class _Batcher:
    """Group commit on the leader: commands that arrive while entries are in flight wait and go
    out together as the next entry.  At most `max_inflight_entries` entries are in flight, so an
    idle leader proposes a lone request at once and a busy one batches.

    One by default: on two cores every entry in flight costs its own round, syncs and acks
    without adding parallelism, and with one the entries simply grow with the load (2026-12-03,
    3 nodes, fsync always, interleaved runs: 64 clients 10.2k vs 8.1k transfers/s, 8 clients
    3.1k vs 2.7k, one client and 8k batches unchanged; 5 nodes likewise).

    Each queued command carries the request id and connection its reply goes to (connection
    None: the leader's own idle tick, answered to nobody).  An entry's replies are written
    straight from the node's callback — no future, task or timer per request."""

    def __init__(self, server: Server):
        self.server = server
        self.queue: collections.deque = collections.deque()  # (command, rid, conn, bytes)
        self.queued_bytes = 0  # the requests' bytes in `queue`
        self.inflight = 0
        self.last_propose = 0.0
        self._scheduled = False

    def add(self, command: dict, rid: int, conn: "_Conn | None", size: int) -> None:
        """Queue `command`; `size` is the request's length on the wire, which bounds its share
        of the entry (its msgpack in the entry is no longer: the envelope is left out, and
        events may travel compact)."""
        self.queue.append((command, rid, conn, size))
        self.queued_bytes += size
        if not self.inflight and not self._scheduled:
            self._flush()  # an idle leader: no entry to wait for, go now
        elif not self._scheduled and self.inflight < self.server.settings.max_inflight_entries:
            # Let the requests already read from sockets in this loop turn join the entry.
            self._scheduled = True
            self.server._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        limit = self.server.settings.max_entry_bytes
        queue = self.queue
        while queue and self.inflight < self.server.settings.max_inflight_entries:
            items, size = [], 0
            while queue:
                n = queue[0][3]
                if items and size + n > limit:
                    break
                items.append(queue.popleft())
                size += n
            self.queued_bytes -= size
            self._propose(items)

    def _propose(self, items: list) -> None:
        server = self.server
        try:
            decoded = (server.stamp(), [it[0] for it in items])
            payload = msgpack.packb(decoded, use_bin_type=True)
        except Exception as e:  # e.g. the HLC guard refused to stamp
            log.warning("not proposing: %s", e)
            self._answer(items, Code.NO_LEADER, None, 0)
            return
        self.inflight += 1
        self.last_propose = time.monotonic()
        # One deadline for the whole entry: its requests time out together (outcome unknown:
        # the entry may still commit), and the in-flight slot stays taken until the node
        # answers, so a slow commit throttles proposing instead of piling up entries.
        entry = [items, None]
        entry[1] = server._loop.call_later(server.settings.request_timeout_s, self._expire, entry)
        if server.node.runs_on(server._loop):
            # Called on this loop's thread while the node applies: write the replies now,
            # before the rest of the tick, not one loop pass later.
            def on_result(code, replies, index):
                self._resolved(entry, code, replies, index)
        else:
            to_loop = server.to_loop

            def on_result(code, replies, index):
                to_loop(self._resolved, entry, code, replies, index)

        # The commands are ours alone from here (built by `_write` from a decoded request), so
        # the node may apply these objects instead of unpacking the entry again.
        server.node.propose(payload, on_result, decoded=decoded)

    def _answer(self, items: list, code, replies, index) -> None:
        # An entry's replies to one connection leave in one write: with many clients sharing
        # a connection, a send per reply cost more than the rest of the reply.
        server = self.server
        write_done = server._write_done
        server._cork()
        try:
            for i, (_, rid, conn, _) in enumerate(items):
                if conn is not None:
                    write_done(code, replies[i] if replies is not None else None, index, rid,
                               conn)
        finally:
            server._uncork()

    def _expire(self, entry: list) -> None:
        items, entry[0] = entry[0], None
        if items is not None:
            self._answer(items, Code.TIMEOUT, None, 0)

    def _resolved(self, entry: list, code, replies, index) -> None:
        self.inflight -= 1
        entry[1].cancel()
        items, entry[0] = entry[0], None
        if items is not None:  # else: already answered `timeout`
            self._answer(items, code, replies if code == Code.OK else None, index)
        if self.queue and not self._scheduled:
            self._scheduled = True
            self.server._loop.call_soon(self._flush)


class _ReadBarrier:
    """Linearizable reads share leadership confirmations: every read that arrives while one
    `read_index` round is in flight waits for the next round, which starts after it arrived."""

    def __init__(self, server: Server):
        self.server = server
        self.waiting: list[asyncio.Future] = []
        self.running = False

    def wait(self) -> asyncio.Future:
        fut = self.server._loop.create_future()
        self.waiting.append(fut)
        if not self.running:
            self._start()
        return fut

    def _start(self) -> None:
        self.running = True
        batch, self.waiting = self.waiting, []
        to_loop = self.server.to_loop

        def done(code, index):
            to_loop(self._finish, batch, code, index)

        self.server.node.read_index(done)

    def _finish(self, batch, code, index) -> None:
        self.running = False
        for f in batch:
            if not f.done():
                f.set_result((code, index))
        if self.waiting:
            self._start()


class _Conn(asyncio.Protocol):
    """One client connection: frames in (`wire.FrameBuffer`), replies out.  It stops reading
    while the transport's write buffer is over its high-water mark, so a client that does not
    read its replies stops being served instead of growing our memory."""

    def __init__(self, server: Server):
        self.server = server
        self.frames = wire.FrameBuffer(server.settings.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.pending = 0  # requests read and not yet answered
        self._out: list[bytes] = []  # replies held while the server is corked
        self.last_active = self.frame_since = time.monotonic()
        self._closing = False
        self.shed = False  # over the connection cap: its requests are refused, then it closes

    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if len(server._conns) >= server.max_connections:
            server._at_cap()
            if len(server._shed) >= SHED_MAX:
                self._closing = True
                transport.abort()  # no room even to answer it
                return
            self.shed = True
            server._shed.add(self)
            server._loop.call_later(OVER_CAP_GRACE_S, self.close)
            return
        server._conns.add(self)

    def _refuse(self, data: bytes) -> None:
        """Over the cap: the requests that came are answered `overloaded` (nothing applied;
        closed unanswered, a client could not tell: a pipelining client has several), and the
        connection closed."""
        payloads = self.frames.feed(data)
        message = (f"this node has {len(self.server._conns)} client connections open, the "
                   f"most it takes (server.max_connections, or what its file descriptor limit "
                   f"leaves); nothing was applied: retry, or close idle connections")
        for payload in payloads:
            head = wire.peek(payload)
            if head is None:
                try:
                    head = (None, wire.decode(payload, self.server.settings.max_frame_bytes).id)
                except ProtocolError:
                    head = (None, 0)
            self.server._send(self, wire.reply(head[1], Code.OVERLOADED, message=message))
        if payloads or self.frames.error is not None:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.shed:
            self._refuse(data)
            return
        now = time.monotonic()
        self.last_active = now
        was_partial = self.frames.partial
        server = self.server
        server._cork()  # replies given at once (refusals, errors) leave in one write
        try:
            payloads = self.frames.feed(data)
            dispatch = server._dispatch
            for payload in payloads:
                dispatch(payload, self)
        except Exception:  # pragma: no cover - a bug here must not take the server down
            log.exception("connection handler failed")
            self.close()
            return
        finally:
            server._uncork()
        if self.frames.error is not None:
            # An oversized announcement: the stream is out of step.  Say why and close.
            self.server._send(self, wire.reply(0, Code.INVALID_REQUEST,
                                               message=str(self.frames.error)))
            self.close()
        elif self.frames.partial and (payloads or not was_partial):
            self.frame_since = now  # the buffered frame started in this piece

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self._closing = True
        self.server._conns.discard(self)
        self.server._shed.discard(self)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._closing:
            self.transport.resume_reading()

    def is_closing(self) -> bool:
        return self._closing or self.transport is None or self.transport.is_closing()

    def write(self, frame: bytes) -> None:
        server = self.server
        if server._cork_depth:
            if not self._out:
                server._corked.append(self)
            self._out.append(frame)
        else:
            self.transport.write(frame)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


# --- The node process ---------------------------------------------------------------------------

#: Fault injection for tests: a node started with this variable reads a wall clock shifted by
#: that many milliseconds (the nemesis skews clocks this way; the system clock is left alone).
CLOCK_SKEW_ENV = "RAFTPAY_CLOCK_SKEW_MS"
#: Fault injection for tests: every snapshot writer of a node started with this variable pauses
#: that many milliseconds half way through its file (a large ledger, made slow on purpose).
SNAPSHOT_DELAY_ENV = "RAFTPAY_SNAPSHOT_DELAY_MS"


def _snapshot_delay_s() -> float:
    import os
    delay_ms = int(os.environ.get(SNAPSHOT_DELAY_ENV, "0") or 0)
    if delay_ms:
        log.warning("snapshot writers pause %d ms (%s)", delay_ms, SNAPSHOT_DELAY_ENV)
    return delay_ms / 1000


def _wall_clock() -> Callable[[], int]:
    import os
    skew_ms = int(os.environ.get(CLOCK_SKEW_ENV, "0") or 0)
    if skew_ms:
        log.warning("wall clock skewed by %+d ms (%s)", skew_ms, CLOCK_SKEW_ENV)
    return lambda: time.time_ns() // 1_000_000 + skew_ms


class ClockWatch:
    """Samples the peers' clocks over their client ports and keeps `guard` (a
    `clock.ClockGuard`) current: a `ping` whose reply carries the peer's wall ms, timed with our
    own wall clock before and after (TigerBeetle's ping/pong; offset and error bound as SNTP
    computes them).  Runs as a task in the server's loop; never on the commit path."""

    def __init__(self, peers: dict[str, str], guard, wall_ms: Callable[[], int],
                 interval_s: float = 1.0):
        self.peers, self.guard, self.wall_ms, self.interval_s = peers, guard, wall_ms, interval_s

    async def run(self) -> None:
        from .client import AsyncClient
        from .codes import RaftpayError
        if not self.peers:
            return
        client = AsyncClient(list(self.peers.values()), timeout_s=1.0, attempt_timeout_s=1.0,
                             use_session=False)
        try:
            while True:
                for peer, addr in self.peers.items():
                    t1 = self.wall_ms()
                    try:
                        rb = await client._call("ping", {}, addr=addr)
                    except RaftpayError:
                        continue
                    t4 = self.wall_ms()
                    if type(rb.get("wall_ms")) is int:
                        self.guard.add_sample(peer, t1, rb["wall_ms"], t4)
                await asyncio.sleep(self.interval_s)
        finally:
            await client.close()


class ClockRefused(Exception):
    """The leader's clock is too far from the cluster's to stamp an entry."""


def guarded_stamp(hlc, guard, node, events=None) -> Callable[[], int]:
    """The leader's stamp function: HLC now, unless the clock guard says this node's wall clock
    is further than the allowed offset from the cluster's.  Then it refuses (the batcher answers
    no_leader, nothing is proposed), logs loudly, and asks the node to step down."""

    def stamp() -> int:
        if not guard.ok():
            est = guard.cluster_offset()
            log.error("CLOCK GUARD: this node's clock is %.0f ms from the cluster's (allowed %d "
                      "ms); refusing to stamp entries and stepping down", est.offset_ms,
                      guard.max_offset_ms)
            if events is not None:
                events.write("clock.guard", offset_ms=round(est.offset_ms),
                             max_offset_ms=guard.max_offset_ms)
            node.step_down(avoid={str(p) for p in guard.suspects()})
            raise ClockRefused(f"clock off by {est.offset_ms:.0f} ms")
        return hlc.now()

    return stamp


async def _log_role_changes(node, events, interval_s: float = 0.1) -> None:
    """Write an event whenever the node's role, term or known leader changes."""
    last = None
    while True:
        st = node.status()
        now = (st.get("role"), st.get("term"), st.get("leader_id"))
        if now != last:
            events.write("raft.role", role=now[0], term=now[1], leader=now[2])
            last = now
        await asyncio.sleep(interval_s)


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """The event a node process waits on: set by SIGTERM or SIGINT (when this is the main
    thread; a test running serve() in a thread sets it itself).  Loop thread."""
    import signal
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    return stop


def _observe(hlc, ts: int) -> None:
    """Receive rule on apply.  A stamp too far ahead of our wall clock is not adopted (the HLC
    guard refuses it); the ledger still orders it, and the warning says whose clock is off."""
    from .clock import ClockOffsetError
    try:
        hlc.observe(ts)
    except ClockOffsetError as e:
        log.warning("applied entry stamped beyond the clock guard: %s", e)


async def serve(cfg, *, stop: asyncio.Event | None = None, on_ready=None) -> None:
    """Run one raft-mode node from a validated `NodeConfig` until `stop` is set (or SIGTERM /
    SIGINT): the Raft node, its clock, and this server on the client address.

    Blocks (it is the process's main coroutine).  Stops cleanly: the server closes first so no
    reply is cut in half, then the node flushes and releases its port and files.
    """
    import os

    from .clock import HLC, ClockGuard, NtpMonitor
    from .logmerge import EventLog
    from .config import parse_addr
    from .node import Node

    wall_ms = _wall_clock()
    hlc = HLC(wall_ms=wall_ms, max_offset_ms=cfg.clock.max_offset_ms)
    # Every replica moves its clock forward by what it applies, so a new leader never stamps
    # below the log (the ledger normalises too; this keeps the stamps close to real time).
    node = Node(cfg.node.id, cfg.node.raft_addr, {p.id: p.raft_addr for p in cfg.other_peers},
                cfg.node.data_dir, secret=cfg.cluster.secret or None, fsync=cfg.raft.fsync,
                election_timeout_ms=cfg.raft.election_timeout_ms,
                heartbeat_ms=cfg.raft.heartbeat_ms,
                append_entries_batch_bytes=cfg.raft.append_entries_batch_bytes,
                append_backlog_bytes=cfg.raft.append_backlog_bytes,
                log_compaction_min_entries=cfg.raft.log_compaction_entries,
                log_compaction_min_bytes=cfg.raft.log_compaction_bytes,
                session_ttl_ms=cfg.ledger.session_ttl_ms,
                on_apply=lambda index, ts, replies: _observe(hlc, ts),
                snapshot_delay_s=_snapshot_delay_s(), freeze_heap=True,
                new_data_dir=False,  # `raftpay node init` makes a new node's dir
                cluster_name=cfg.cluster.name, client_addr=cfg.node.client_addr)
    by_id = {p.id: p.client_addr for p in cfg.cluster.peers}
    mirror = None
    if cfg.zk.hosts:
        # Discovery only: the mirror polls node.status() (which never blocks) from its own
        # thread and writes znodes there, so a slow or absent ZooKeeper never touches a commit.
        from .zk import ZkMirror

        def mirror_view() -> dict:
            st = node.status()
            return {"client_addr": cfg.node.client_addr, "role": st.get("role", "follower"),
                    "term": st.get("term", 0)}

        mirror = ZkMirror(cfg.zk.hosts, cfg.cluster.name, cfg.node.id, mirror_view,
                          root=cfg.zk.root, digest=cfg.zk.digest or None,
                          session_timeout_s=cfg.zk.session_timeout_ms / 1000)
    # A structured, HLC-stamped event log per node: `raftpay logs merge` orders several
    # nodes' logs into one history even when their wall clocks disagree.
    os.makedirs(cfg.node.data_dir, exist_ok=True)
    events = EventLog(os.path.join(cfg.node.data_dir, "events.jsonl"), hlc, cfg.node.id)
    events.write("node.started", raft_addr=cfg.node.raft_addr,
                 client_addr=cfg.node.client_addr, fsync=cfg.raft.fsync)
    guard = ClockGuard(cfg.clock.max_offset_ms)
    watch = ClockWatch({p.id: p.client_addr for p in cfg.other_peers}, guard, wall_ms)
    ntp = NtpMonitor(list(cfg.clock.ntp_servers), interval_s=16.0) if cfg.clock.ntp_servers \
        else None

    def extra_status() -> dict:
        est = guard.cluster_offset()
        clock = {"wall_ms": wall_ms(), "max_offset_ms": cfg.clock.max_offset_ms,
                 "cluster_offset_ms": est.offset_ms if est else None,
                 "bound_ms": (est.hi_ms - est.lo_ms) / 2 if est else None,
                 "guard_ok": guard.ok(),
                 "suspects": [str(p) for p in guard.suspects()]}
        if ntp is not None:
            clock["ntp"] = ntp.status()
            if ntp.exceeds(cfg.clock.max_offset_ms):
                log.warning("NTP: this node's clock is off by %s ms (+- %s), beyond the guard "
                            "of %d ms", ntp.offset_ms, ntp.error_ms, cfg.clock.max_offset_ms)
        return {"client_addr": cfg.node.client_addr, "members": by_id, "hlc": hlc.peek(),
                "clock": clock,
                **({"zk": mirror.status()} if mirror else {})}

    server = Server(node, stamp=guarded_stamp(hlc, guard, node, events), client_addr_of=by_id.get,
                    settings=ServerSettings.from_config(cfg), extra_status=extra_status,
                    wall_ms=wall_ms)
    stop = stop_on_signals(stop)
    loop = asyncio.get_running_loop()
    # The Raft group ticks on this loop: one thread serves clients and runs Raft.
    node.start(loop=loop)
    try:
        host, port = parse_addr(cfg.node.client_addr)
        await server.start(host, port)
        log.info("node %s serving clients on %s", cfg.node.id, cfg.node.client_addr)
        watch_task = asyncio.create_task(watch.run())
        events_task = asyncio.create_task(_log_role_changes(node, events))
        if ntp is not None:
            ntp.start()
        if mirror is not None:
            mirror.start()  # returns at once, even with ZooKeeper down
        if on_ready:
            on_ready(server)
        await stop.wait()
    finally:
        if ntp is not None:
            ntp.stop()
        if "watch_task" in locals():
            watch_task.cancel()
            events_task.cancel()
        events.write("node.stopped")
        events.close()
        await server.stop()
        if mirror is not None:
            # Closing the session removes our znodes now rather than a session timeout later.
            await loop.run_in_executor(None, mirror.stop)
        node.stop()

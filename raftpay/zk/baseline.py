"""The ZooKeeper-elected baseline: primary-backup replication of the same ledger, for comparison.

Design.  This is the classic design that raftpay's Raft mode is measured against, done as safely
as the design allows.  ZooKeeper decides who leads; the nodes replicate the log themselves.

* Election.  Every node creates an ephemeral sequential znode under
  ``/raftpay/<cluster>/election`` and watches only its predecessor (the herd-free recipe, as in
  kazoo's `Election`); the node with the smallest sequence number is the primary.  That sequence
  number is the primary's *epoch*: a later primary always has a larger one, because its znode was
  created after the previous primary's.  A primary steps down the moment kazoo reports SUSPENDED
  or LOST, and on any sign that a newer epoch exists.
* Membership.  Each node's `ZkMirror` keeps ``/members/<node_id>`` (and, while it leads,
  ``/leader``) current, the same directory Raft mode publishes, so `LeaderWatch` and
  `Client.from_zookeeper` work with both modes.  The primary replicates to the members it sees
  there, at their configured `raft_addr`.
* Replication.  The primary appends each proposal (msgpack ``[ts, commands]``) to its log file as
  batch ``seq`` of its epoch, fsyncs it (``[raft] fsync = "always"``) and streams it to every
  member over our own msgpack-over-TCP framing, never pickle; with a cluster secret every frame
  carries an HMAC-SHA256 under a per-connection key, with a counter against replay.  A follower
  accepts a batch only if its log matches the primary's at the previous position, persists it,
  and acknowledges.  The primary commits a batch once its quorum acknowledged it, then applies it
  to the `Ledger` and replies; followers apply up to the commit point the primary sends them, so
  no replica ever applies a batch that may later be discarded.  Retried requests are dropped by
  the ledger's idempotency (transfer ids, sessions) and re-sent batches by their sequence number.
* Quorum.  ``"majority"``: a majority of the configured cluster (the Raft rule).  ``"all"``: every
  member of the in-sync set (ISR) kept in ZooKeeper at ``/raftpay/<cluster>/isr`` (Kafka's rule,
  the faithful form of "every live member acks").  A member joins the ISR once it has caught up
  with everything committed, and it counts from that moment; the primary removes a member whose
  znode vanished or that lags longer than the session timeout, writing the ISR (compare-and-set on
  its version) *before* it commits anything without it.  So every ISR member holds every
  committed batch, which is what makes "any surviving member has them" true even after members
  restart.
* Fencing.  Every message to a follower carries the sender's epoch; a follower persists the
  highest epoch it has seen and rejects anything older, and a primary that is rejected for its
  epoch steps down.  A new primary first *promises* its epoch to the members it reaches, so a
  deposed primary (paused, partitioned) can no longer collect the acknowledgements it needs.
* Catch-up.  Before serving, a new primary hears from its members (for "all": at least one ISR
  member, or it is one itself; for "majority": a majority), pulls the missing batches from the
  one with the highest (epoch of last batch, seq) if that beats its own log, writes the new ISR,
  and appends an empty *barrier* batch of its own epoch; nothing is committed (and no
  linearizable read answered) until the barrier is.  This is Raft's rule for committing entries
  of earlier terms; without it a batch acknowledged only by old-epoch copies could be overwritten.
  Each follower is brought up to date from where its log still matches (a divergent suffix,
  which can only hold uncommitted batches, is truncated back to its commit point).
* Restart.  The log file is replayed into a fresh `Ledger` up to the last commit mark; the rest
  is confirmed (or truncated) by the next primary.

Threads.  All protocol state lives on one asyncio loop in the node's own thread.  The public
methods are the ones `raftpay.server.Server` uses on `raftpay.node.Node`, with the same
contracts: thread-safe, never blocking (except `start`, `stop` and `query`), callbacks on the
node's thread.  kazoo runs its own threads; its callbacks only hand events to the loop.

What it does not do: log compaction and snapshots (the whole log is kept in memory and on disk,
and lagging members always get batches), dynamic cluster membership beyond `cluster.peers`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import heapq
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from typing import Any, Callable

import msgpack
from kazoo.exceptions import (BadVersionError, KazooException, NodeExistsError, NoNodeError)
from kazoo.protocol.states import KazooState

from raftpay import wire
from raftpay.codes import Code, ProtocolError
from raftpay.config import parse_addr
from raftpay.node import PeerComplaints, claim_data_dir, clear_rejoin_mark, cluster_id
from raftpay.zk.mirror import ZkMirror, _close_client, cluster_path, make_client

log = logging.getLogger(__name__)

#: The node's log, inside `data_dir`.
LOG_FILE = "zk-baseline.log"
#: Names the protocol in the handshake and in the key derivation.
PROTOCOL = b"raftpay-zk-baseline-v1"
QUORUMS = ("all", "majority")
FSYNC_POLICIES = ("always", "never")

MAX_PEER_FRAME_BYTES = 64 * 1024 * 1024
#: One catch-up message carries at most this much log.
CATCHUP_CHUNK_BYTES = 1024 * 1024
CATCHUP_CHUNK_RECORDS = 4096
TAG_BYTES = 32
CONNECT_TIMEOUT_S = 2.0
RPC_TIMEOUT_S = 5.0
RECONNECT_MAX_S = 0.5
#: How long a new primary waits for every live member to report before it settles for the ones
#: that did (it never waits for a member that cannot hold a committed batch it lacks).
SYNC_GRACE_S = 0.5
#: The payload of a new primary's barrier: an empty batch, which changes no ledger state.
BARRIER_PAYLOAD = msgpack.packb([0, []], use_bin_type=True)


class FatalNodeError(RuntimeError):
    """This replica cannot go on without risking divergence (an apply raised, a committed batch
    would be truncated, the log does not load).  It leaves the election; an operator must look."""


class _StaleEpoch(Exception):
    """A follower has promised a newer epoch than ours: we are a deposed primary."""


def election_path(root: str, cluster: str) -> str:
    return f"{cluster_path(root, cluster)}/election"


def isr_path(root: str, cluster: str) -> str:
    """Persistent znode holding the in-sync set (quorum "all")."""
    return f"{cluster_path(root, cluster)}/isr"


def _seq_of(name: str) -> int:
    # ZooKeeper appends a 10-digit counter to sequential znode names.
    return int(name[-10:])


def _epoch_of(name: str) -> int:
    # The counter starts at 0; epochs start at 1 so that 0 can mean "none yet" (the empty log).
    return _seq_of(name) + 1


# --- The log file ---------------------------------------------------------------------------------

class _LogFile:
    """Append-only record file: ``[u32 length][u32 crc32][msgpack record]`` per record.

    Records: ``["E", epoch]`` (an epoch promise), ``["B", epoch, seq, payload]`` (a batch),
    ``["T", seq]`` (drop batches after seq), ``["C", seq]`` (committed up to seq; written without
    its own fsync — losing one only means applying less at restart).  A torn or corrupt tail is
    cut off at load.  Not thread-safe: the node's loop thread only.
    """

    _HEAD = struct.Struct(">II")

    def __init__(self, path: str, fsync: bool):
        self.path = path
        self.fsync = fsync
        self.syncs = 0
        self._fd = -1

    def load(self) -> tuple[int, list[tuple[int, bytes]], int]:
        """Open (creating) and replay: returns (promised epoch, batches as (epoch, payload),
        commit mark).  Blocks on file I/O.  Raises FatalNodeError on a file it cannot trust."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with open(self.path, "rb") as f:
            data = f.read()
        promised, commit, entries = 0, 0, []
        pos, good = 0, 0
        while pos + self._HEAD.size <= len(data):
            n, crc = self._HEAD.unpack_from(data, pos)
            body = data[pos + self._HEAD.size: pos + self._HEAD.size + n]
            if len(body) < n or zlib.crc32(body) != crc:
                break  # torn write at the tail
            try:
                rec = msgpack.unpackb(body, raw=False)
                kind = rec[0]
                if kind == "E":
                    promised = max(promised, rec[1])
                elif kind == "B":
                    if rec[2] != len(entries) + 1:
                        break  # cannot happen when written by us; trust nothing after it
                    entries.append((rec[1], rec[3]))
                elif kind == "T":
                    del entries[rec[1]:]
                    commit = min(commit, rec[1])
                elif kind == "C":
                    commit = max(commit, rec[1])
                else:
                    break
            except Exception:
                break
            pos += self._HEAD.size + n
            good = pos
        if good < len(data):
            log.warning("%s: dropping %d bytes of torn or corrupt tail", self.path,
                        len(data) - good)
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        return promised, entries, min(commit, len(entries))

    def write(self, records: list, sync: bool = True) -> None:
        """Append records in one write; with `sync` (and the fsync policy) make them durable."""
        chunks = []
        for rec in records:
            body = msgpack.packb(rec, use_bin_type=True)
            chunks.append(self._HEAD.pack(len(body), zlib.crc32(body)))
            chunks.append(body)
        os.write(self._fd, b"".join(chunks))
        if sync and self.fsync:
            os.fsync(self._fd)
            self.syncs += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- Node-to-node transport -------------------------------------------------------------------------

def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _decode_peer(payload: bytes) -> dict:
    """A peer message, decoded as defensively as a client frame (see `wire.decode`)."""
    n = max(len(payload), 1)
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                              max_str_len=n, max_bin_len=n, max_array_len=n,
                              max_map_len=n // 2 or 1, max_ext_len=0)
    except Exception as e:
        raise ProtocolError(f"peer frame is not valid msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("peer frame is not a map")
    return obj


class _Channel:
    """One connection between two nodes, after the handshake.

    Frames are `wire`'s length-prefixed msgpack.  With a secret each payload is followed by
    HMAC-SHA256(key, direction || counter || payload), where the key was derived from the secret
    and both sides' nonces, so a frame cannot be forged, replayed or moved to another connection.
    Loop thread only.
    """

    def __init__(self, reader, writer, key: bytes | None, initiator: bool, peer_id: str):
        self.reader, self.writer = reader, writer
        self.key = key
        self.peer_id = peer_id
        self._out_dir, self._in_dir = (b"i", b"a") if initiator else (b"a", b"i")
        self._sent = self._received = 0

    def _tag(self, direction: bytes, counter: int, payload: bytes) -> bytes:
        return hmac.new(self.key, direction + counter.to_bytes(8, "big") + payload,
                        hashlib.sha256).digest()

    def write(self, msg: dict) -> None:
        payload = msgpack.packb(msg, use_bin_type=True)
        if self.key is not None:
            payload += self._tag(self._out_dir, self._sent, payload)
        self._sent += 1
        self.writer.write(wire.PREFIX.pack(len(payload)) + payload)

    async def send(self, msg: dict) -> None:
        self.write(msg)
        await self.writer.drain()

    async def recv(self) -> dict:
        data = await wire.read_frame(self.reader, MAX_PEER_FRAME_BYTES, RPC_TIMEOUT_S)
        if data is None:
            raise ConnectionError(f"{self.peer_id} closed the connection")
        if self.key is not None:
            payload, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
            if len(data) < TAG_BYTES or not hmac.compare_digest(
                    tag, self._tag(self._in_dir, self._received, payload)):
                raise ProtocolError(f"frame from {self.peer_id} fails authentication: does its "
                                    f"[cluster] secret match this node's?")
        else:
            payload = data
        self._received += 1
        return _decode_peer(payload)

    async def rpc(self, msg: dict, timeout_s: float = RPC_TIMEOUT_S) -> dict:
        """Send and wait for the one reply (only while nothing else reads this channel)."""
        await self.send(msg)
        return await asyncio.wait_for(self.recv(), timeout_s)

    def close(self) -> None:
        self.writer.close()


async def _handshake(reader, writer, *, initiator: bool, my_id: str, secret: str | None,
                     timeout_s: float = CONNECT_TIMEOUT_S,
                     client_port: str | None = None) -> _Channel:
    """Exchange node ids and nonces, derive the connection key.  Raises ProtocolError,
    OSError or TimeoutError.  The initiator sends first; the acceptor answers once it has read
    the initiator's hello, so that a raftpay client on the peer port (a seed list copied from
    the peers') is answered `invalid_request` naming `client_port`: sent our hello first, it
    failed to decode it, retried until its deadline and called its write's outcome unknown."""
    nonce = os.urandom(16)
    hello = msgpack.packb({"p": PROTOCOL, "node": my_id, "nonce": nonce}, use_bin_type=True)
    hello = wire.PREFIX.pack(len(hello)) + hello
    async with asyncio.timeout(timeout_s):
        if initiator:
            writer.write(hello)
            await writer.drain()
        data = await wire.read_frame(reader, 4096, timeout_s)
        if data is None:
            raise ConnectionError("closed during the handshake")
        if not initiator:
            refusal = wire.wrong_port_reply(data, f"node {my_id}'s peer port", client_port)
            writer.write(refusal or hello)
            await writer.drain()
            if refusal:
                raise ProtocolError(f"a raftpay client on the peer port (clients connect to "
                                    f"{client_port or 'the client port'})")
    theirs = _decode_peer(data)
    peer, their_nonce = theirs.get("node"), theirs.get("nonce")
    if theirs.get("p") != PROTOCOL or not isinstance(peer, str) or not isinstance(
            their_nonce, bytes) or len(their_nonce) != 16:
        raise ProtocolError("not a raftpay zk-baseline peer")
    key = None
    if secret:
        ni, na = (nonce, their_nonce) if initiator else (their_nonce, nonce)
        ids = (my_id, peer) if initiator else (peer, my_id)
        key = hmac.new(secret.encode(), PROTOCOL + ni + na + ids[0].encode() + b"\0"
                       + ids[1].encode(), hashlib.sha256).digest()
    return _Channel(reader, writer, key, initiator, peer)


# --- Small pieces -----------------------------------------------------------------------------------

def _call(callback, *args) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("node callback %r raised", callback)


class _Proposal:
    """One proposal's callback, called exactly once."""

    __slots__ = ("callback", "index", "done", "timer", "appended_at", "decoded")

    def __init__(self, callback):
        self.callback = callback
        self.decoded = None  # (payload bytes object, (ts, commands)) from `propose(decoded=)`
        self.index = None
        self.done = False
        self.timer = None
        self.appended_at = 0.0

    def finish(self, code: Code, replies, index) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        _call(self.callback, code, replies, index)


class _Waiter:
    """A read_index or wait_applied request, answered exactly once."""

    __slots__ = ("callback", "index", "round", "done", "timer")

    def __init__(self, callback, index: int = 0):
        self.callback = callback
        self.index = index
        self.round = 0
        self.done = False
        self.timer = None

    def finish(self, code: Code, index) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        _call(self.callback, code, index)


class _Signal:
    """A broadcast edge on the loop: `wait()` gives a future resolved by the next `fire()`.
    Wait on it with `asyncio.wait`, never `wait_for` (which would cancel it for everyone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._fut: asyncio.Future | None = None

    def wait(self) -> asyncio.Future:
        if self._fut is None or self._fut.done():
            self._fut = self._loop.create_future()
        return self._fut

    def fire(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None


async def _first(*aws, timeout_s: float | None = None) -> None:
    """Wait until any of the futures is done (or the timeout); cancels none of them."""
    await asyncio.wait([asyncio.ensure_future(a) for a in aws], timeout=timeout_s,
                       return_when=asyncio.FIRST_COMPLETED)


# --- The primary, one term of leadership ------------------------------------------------------------

class _Link:
    """The primary's stream to one member: connect, promise our epoch, report, match, stream.

    Reconnects with backoff while the member is listed.  `acked` is the highest seq the member
    has durably acknowledged as matching our log; it only grows.  Loop thread only.
    """

    def __init__(self, primary: "_Primary", peer_id: str, addr: str):
        self.primary = primary
        self.node = primary.node
        self.peer_id = peer_id
        self.addr = addr
        self.acked = 0
        self.report: tuple[int, int, int] | None = None  # (last epoch, last seq, commit)
        self.rejoining = False  # its report does not count (`ZkNode._rejoining`)
        self.matched = False
        self.connected = False
        self.chan: _Channel | None = None
        self.pong = 0  # highest read round confirmed
        self.ping_sent = 0
        self.sent_commit = 0
        self.wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        self.task.cancel()
        if self.chan is not None:
            self.chan.close()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            started = time.monotonic()
            try:
                self.chan = await self.node._connect(self.addr, self.peer_id)
                self.connected = True
                await self._session(self.chan)
            except asyncio.CancelledError:
                raise
            except _StaleEpoch as e:
                promised = e.args[0] if e.args else None
                self.primary.depose(f"{self.peer_id} has promised a newer epoch ({promised})")
                if isinstance(promised, int):
                    # So that, should our znode still be first, we re-join the queue instead of
                    # leading again with an epoch the cluster has moved past.
                    self.node._promise(promised)
                return
            except ProtocolError as e:  # a peer misconfigured, not one that is down
                self.node._complaints.warn((self.peer_id, str(e)), f"{self.node.node_id}: link "
                                           f"to {self.peer_id}: {e}")
            except (OSError, ConnectionError, asyncio.TimeoutError,
                    TimeoutError, asyncio.IncompleteReadError) as e:
                log.debug("%s: link to %s: %r", self.node.node_id, self.peer_id, e)
            finally:
                if self.chan is not None:
                    self.chan.close()
                self.chan = None
                self.connected = self.matched = False
                self.report = None
            if time.monotonic() - started > 1.0:
                backoff = 0.05
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, RECONNECT_MAX_S)

    async def _session(self, chan: _Channel) -> None:
        pr, node = self.primary, self.node
        reply = await chan.rpc({"t": "hello", "e": pr.epoch})
        if reply.get("t") == "nack" and reply.get("why") == "stale":
            raise _StaleEpoch(reply.get("promised"))
        if reply.get("t") != "welcome":
            raise ProtocolError(f"unexpected hello reply {reply!r}")
        self.report = (reply["last_epoch"], reply["last_seq"], reply["commit"])
        self.rejoining = reply.get("rejoining") is True
        pr.report_signal.fire()
        # While the primary syncs it may use this channel to fetch batches; we wait.
        await pr.synced.wait()
        last_epoch, last_seq, commit = self.report
        if last_seq <= node.last_seq and node.epoch_at(last_seq) == last_epoch:
            nxt, trunc = last_seq + 1, None  # its log is a prefix of ours
        else:
            # Its tail holds batches we do not have: never committed (we hold every committed
            # batch), so it goes back to its commit point and we send from there.
            if commit > node.last_seq:
                raise ProtocolError(f"{self.peer_id} claims commit {commit} beyond our log")
            nxt, trunc = commit + 1, commit
        self.acked = max(self.acked, nxt - 1)
        self.matched = True
        pr.maybe_commit()
        reader = asyncio.ensure_future(self._read_replies(chan))
        try:
            while True:
                self.wake.clear()
                if reader.done():
                    reader.result()  # raises what ended it
                    raise ConnectionError("reply reader ended")
                sent = False
                if nxt <= node.last_seq:
                    recs, size, i = [], 0, nxt
                    while (i <= node.last_seq and len(recs) < CATCHUP_CHUNK_RECORDS
                           and size < CATCHUP_CHUNK_BYTES):
                        epoch, payload = node._log[i - 1]
                        recs.append([epoch, payload])
                        size += len(payload)
                        i += 1
                    msg = {"t": "append", "e": pr.epoch, "prev": nxt - 1,
                           "pe": node.epoch_at(nxt - 1), "recs": recs, "c": node._commit}
                    if trunc is not None:
                        msg["trunc"] = trunc
                        trunc = None
                    chan.write(msg)
                    self.sent_commit = node._commit
                    nxt = i
                    sent = True
                elif self.sent_commit < node._commit:
                    # Followers apply only what they know is committed: tell them promptly.
                    chan.write({"t": "commit", "e": pr.epoch, "c": node._commit})
                    self.sent_commit = node._commit
                    sent = True
                if self.ping_sent < pr.read_round:
                    self.ping_sent = pr.read_round
                    chan.write({"t": "ping", "e": pr.epoch, "r": self.ping_sent})
                    sent = True
                if sent:
                    await chan.writer.drain()
                    continue
                await self.wake.wait()
        finally:
            reader.cancel()

    async def _read_replies(self, chan: _Channel) -> None:
        pr = self.primary
        try:
            while True:
                m = await chan.recv()
                kind = m.get("t")
                if kind == "ack":
                    seq = m.get("s", 0)
                    if seq > self.acked:
                        self.acked = seq
                        pr.maybe_commit()
                elif kind == "pong":
                    r = m.get("r", 0)
                    if r > self.pong:
                        self.pong = r
                        pr.check_reads()
                elif kind == "nack" and m.get("why") == "stale":
                    raise _StaleEpoch(m.get("promised"))
                else:
                    # "resync" (it lost its place: reconnect and match again) or garbage.
                    raise ProtocolError(f"{self.peer_id}: {m!r}")
        finally:
            self.wake.set()


class _Primary:
    """This node's leadership under one epoch: sync, then serve until deposed.  Loop only."""

    def __init__(self, node: "ZkNode", epoch: int):
        self.node = node
        self.epoch = epoch
        self.links: dict[str, _Link] = {}
        self.serving = False
        self.synced = asyncio.Event()
        self.deposed = asyncio.Event()
        self.reason: str | None = None
        self.report_signal = _Signal(node._loop)
        self.barrier_seq: int | None = None
        self.pending: dict[int, _Proposal] = {}  # appended, not yet applied; in seq order
        # Quorum "all": the ISR as written in ZooKeeper, and as we want it.  A member counts
        # from the moment we *want* it (stricter than needed) until the ZooKeeper ISR no longer
        # has it, so the written ISR never names a member that lacks a committed batch.
        self.isr_zk: set[str] = set()
        self.isr_version = -1
        self.want_isr: set[str] = set()
        self.isr_dirty = asyncio.Event()
        # Linearizable reads.
        self.read_round = 0
        self.reads: list[_Waiter] = []
        self.reads_before_barrier: list[_Waiter] = []
        self.tasks: list[asyncio.Task] = []
        self.became_leader_at: float | None = None

    # --- membership -------------------------------------------------------------------------

    def counted(self) -> set[str]:
        return (self.isr_zk | self.want_isr) - {self.node.node_id}

    def on_members(self, members: set[str]) -> None:
        node = self.node
        for m in members - set(self.links):
            self.links[m] = _Link(self, m, node.peers[m])
        for m in set(self.links) - members:
            self.links.pop(m).stop()
            if m in self.want_isr and node.quorum == "all":
                log.info("%s: %s left; removing it from the ISR", node.node_id, m)
                self.want_isr.discard(m)
                self.isr_dirty.set()
        self.report_signal.fire()
        self.maybe_commit()

    # --- the term ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync, then serve until deposed.  Returns when deposed."""
        node = self.node
        self.on_members(node._members)
        sync = asyncio.ensure_future(self._sync())
        self.tasks.append(sync)
        await _first(self.deposed.wait(), sync)
        if sync.done() and not sync.cancelled() and sync.exception() is not None:
            e = sync.exception()
            if isinstance(e, _StaleEpoch):
                self.depose(f"a member has promised a newer epoch ({e.args[0]})")
                if isinstance(e.args[0], int):
                    node._promise(e.args[0])  # re-join the queue rather than lead again
            else:
                log.error("%s: sync failed", node.node_id, exc_info=e)
                self.depose(f"sync failed: {e!r}")
        await self.deposed.wait()

    async def _sync(self) -> None:
        node = self.node
        me = node.node_id
        grace_until = time.monotonic() + SYNC_GRACE_S
        while not self.deposed.is_set():
            changed = self.report_signal.wait()
            reports = {pid: l.report for pid, l in self.links.items() if l.report is not None}
            # A node that lost its data and rejoins holds nothing it can vouch for.
            counted = {pid: rep for pid, rep in reports.items() if not self.links[pid].rejoining}
            ready, isr, version = False, None, -1
            if node.quorum == "majority":
                ready = 1 + len(counted) >= node.majority
            else:
                try:
                    isr, version = await node._read_isr()
                except (KazooException, asyncio.TimeoutError, TimeoutError) as e:
                    log.info("%s: cannot read the ISR yet: %r", me, e)
                    await _first(changed, timeout_s=0.2)
                    continue
                # Any ISR member holds every committed batch; hearing from one (or being one)
                # is enough, and its promise fences the old primary, which needs it to commit.
                # Being one, or hearing from one, counts only with a log: the ISR outlives the
                # nodes, and a member whose data was lost (its dir made anew) is listed still,
                # holding nothing (every ISR member holds at least its primary's barrier batch).
                ready = (isr is None or (me in isr and node.last_seq > 0)
                         or any(pid in isr and rep[1] > 0 for pid, rep in counted.items()))
                if not ready and time.monotonic() >= grace_until:
                    self._say_waiting_for_isr(isr, counted)
                # Give the other live members a moment to report too, so the new ISR starts
                # with everyone who is already up to date rather than with us alone.
                everyone = set(reports) >= (node._members & set(self.links))
                ready = ready and (everyone or time.monotonic() >= grace_until)
            if not ready:
                await _first(changed, timeout_s=0.2)
                continue
            reports = {pid: l.report for pid, l in self.links.items() if l.report is not None}
            mine = (node.epoch_at(node.last_seq), node.last_seq)
            best_id, best = None, mine
            for pid, rep in reports.items():
                if (rep[0], rep[1]) > best:
                    best_id, best = pid, (rep[0], rep[1])
            if best_id is not None:
                try:
                    await self._fetch(self.links[best_id], best)
                except (OSError, ConnectionError, ProtocolError, asyncio.TimeoutError,
                        TimeoutError, KeyError) as e:
                    log.warning("%s: fetching from %s failed: %r; retrying", me, best_id, e)
                    await asyncio.sleep(0.1)
                    continue
            if node.quorum == "all":
                # Members whose last batch equals ours now hold exactly our log.
                now = (node.epoch_at(node.last_seq), node.last_seq)
                new_isr = {me} | {pid for pid, rep in reports.items() if (rep[0], rep[1]) == now}
                try:
                    self.isr_version = await node._write_isr(new_isr, self.epoch, version)
                except (BadVersionError, NodeExistsError, NoNodeError):
                    continue  # changed since we read it: read again
                except (KazooException, asyncio.TimeoutError, TimeoutError) as e:
                    log.info("%s: cannot write the ISR yet: %r", me, e)
                    await asyncio.sleep(0.1)
                    continue
                log.info("%s: ISR now %s", me, sorted(new_isr))
                self.isr_zk = set(new_isr)
                self.want_isr = set(new_isr)
                self.tasks.append(asyncio.ensure_future(self._isr_writer()))
            # The barrier: nothing commits, and no read is answered, before a batch of our own
            # epoch has reached the quorum (Raft §5.4.2).
            self.barrier_seq = node._append_local([(self.epoch, BARRIER_PAYLOAD)])
            self.serving = True
            self.became_leader_at = time.monotonic()
            node._role = "leader"
            self.synced.set()
            log.info("%s: primary for epoch %d (log %d, commit %d, quorum %s)", me, self.epoch,
                     node.last_seq, node._commit, node.quorum)
            self.wake_links()
            self.maybe_commit()
            return

    def _say_waiting_for_isr(self, isr: set[str], counted: dict) -> None:
        """Once a minute while a new primary waits for an ISR member with a log: which members
        it waits for, and, when every one answers with none, that nothing it committed is left
        here.  A cluster whose every node lost its data, or a new cluster made under the name
        of an old one (its ISR is still in ZooKeeper), otherwise waited without a word."""
        node = self.node
        empty = sorted(pid for pid in isr if pid in counted) + (
            [node.node_id] if node.node_id in isr else [])
        missing = sorted(isr - set(empty))
        if missing:
            why = (f"waiting for {', '.join(missing)} (the members that hold every committed "
                   f"batch; {', '.join(empty) or 'none'} answered with an empty log)")
        else:
            why = (f"every one of them answered with an empty log, so what they committed is "
                   f"not on any node that is up. If every node of this cluster lost its data, "
                   f"or this is a new cluster under an old one's name, nothing committed is "
                   f"left: delete {node._isr_path} in ZooKeeper (or name the cluster anew) to "
                   f"start empty")
        node._complaints.warn(("isr-empty", tuple(sorted(isr)), tuple(missing)), (
            f"{node.node_id}: elected, but the in-sync set in ZooKeeper is "
            f"{', '.join(sorted(isr))}: {why}"))

    async def _fetch(self, link: _Link, best: tuple[int, int]) -> None:
        """Pull batches from `link`'s member until our last batch is `best`."""
        node = self.node
        while (node.epoch_at(node.last_seq), node.last_seq) != best:
            chan = link.chan
            if chan is None:
                raise ConnectionError(f"{link.peer_id} disconnected")
            after = node.last_seq
            reply = await chan.rpc({"t": "fetch", "e": self.epoch, "after": after,
                                    "ae": node.epoch_at(after)})
            if reply.get("t") == "nack" and reply.get("why") == "stale":
                raise _StaleEpoch(reply.get("promised"))
            if reply.get("t") == "mismatch":
                if after <= node._commit:
                    raise FatalNodeError(f"{link.peer_id} does not hold our committed batch "
                                         f"{after}")
                node._truncate(node._commit)  # our uncommitted tail is not the newest history
                continue
            recs = reply.get("recs") or []
            if reply.get("t") != "batches" or not recs:
                raise ProtocolError(f"bad fetch reply {reply.get('t')!r}")
            node._append_local([(e, p) for e, p in recs])
        log.info("%s: caught up from %s to seq %d", node.node_id, link.peer_id, node.last_seq)

    async def _isr_writer(self) -> None:
        node = self.node
        while not self.deposed.is_set():
            await self.isr_dirty.wait()
            self.isr_dirty.clear()
            while self.want_isr != self.isr_zk and not self.deposed.is_set():
                want = set(self.want_isr)
                try:
                    self.isr_version = await node._write_isr(want, self.epoch, self.isr_version)
                except (BadVersionError, NoNodeError, NodeExistsError):
                    self.depose("the ISR was changed by someone else")
                    return
                except (KazooException, asyncio.TimeoutError, TimeoutError) as e:
                    log.info("%s: ISR write failed: %r; retrying", node.node_id, e)
                    await asyncio.sleep(0.1)
                    continue
                log.info("%s: ISR now %s", node.node_id, sorted(want))
                self.isr_zk = want
                self.maybe_commit()

    # --- commit -----------------------------------------------------------------------------

    def maybe_commit(self) -> None:
        if not self.serving:
            return
        node = self.node
        own = node.last_seq  # our own batches are durable before they are sent
        if node.quorum == "all":
            c = own
            for pid in self.counted():
                link = self.links.get(pid)
                c = min(c, link.acked if link is not None else 0)
        else:
            acks = sorted([own] + [l.acked for l in self.links.values()], reverse=True)
            c = acks[node.majority - 1] if len(acks) >= node.majority else 0
        if c >= self.barrier_seq and c > node._commit:
            node._advance_commit(c)
            self.wake_links()
            if self.reads_before_barrier:
                waiting, self.reads_before_barrier = self.reads_before_barrier, []
                for w in waiting:
                    self.start_read(w)
        if node.quorum == "all":
            for pid, link in self.links.items():
                if (pid not in self.want_isr and link.matched and node._commit >= self.barrier_seq
                        and link.acked >= node._commit):
                    log.info("%s: %s caught up (seq %d); adding it to the ISR", node.node_id,
                             pid, link.acked)
                    self.want_isr.add(pid)
                    self.isr_dirty.set()

    def check_lag(self, now: float) -> None:
        """Quorum "all": a counted member that holds up a batch for longer than the lag timeout
        leaves the ISR (after the ZooKeeper write), so one slow member cannot stop writes."""
        if not self.serving or self.node.quorum != "all" or not self.pending:
            return
        oldest_seq = next(iter(self.pending))
        oldest = self.pending[oldest_seq]
        if now - oldest.appended_at < self.node.lag_timeout_s:
            return
        for pid in self.counted():
            link = self.links.get(pid)
            if pid in self.want_isr and (link is None or link.acked < oldest_seq):
                log.warning("%s: %s has not acknowledged seq %d for %.1f s; removing it from the "
                            "ISR", self.node.node_id, pid, oldest_seq, now - oldest.appended_at)
                self.want_isr.discard(pid)
                self.isr_dirty.set()

    def wake_links(self) -> None:
        for link in self.links.values():
            link.wake.set()

    # --- reads ------------------------------------------------------------------------------

    def start_read(self, w: _Waiter) -> None:
        if self.barrier_seq is None or self.node._commit < self.barrier_seq:
            self.reads_before_barrier.append(w)
            return
        self.read_round += 1
        w.round = self.read_round
        w.index = self.node._commit
        self.reads.append(w)
        self.wake_links()
        self.check_reads()

    def check_reads(self) -> None:
        if not self.reads or not self.serving:
            return
        node = self.node
        if node.quorum == "all":
            confirmed = self.read_round
            for pid in self.counted():
                link = self.links.get(pid)
                confirmed = min(confirmed, link.pong if link is not None else 0)
        else:
            need = node.majority - 1
            pongs = sorted((l.pong for l in self.links.values()), reverse=True)
            confirmed = self.read_round if need == 0 else (
                pongs[need - 1] if len(pongs) >= need else 0)
        still = []
        for w in self.reads:
            if w.done:
                continue
            if w.round <= confirmed:
                w.finish(Code.OK, w.index)  # the primary applies at commit: applied >= index
            else:
                still.append(w)
        self.reads = still

    # --- the end ----------------------------------------------------------------------------

    def depose(self, reason: str) -> None:
        """Stop leading now: nothing more commits or is answered OK under this epoch."""
        if self.deposed.is_set():
            return
        self.reason = reason
        was_serving = self.serving
        self.serving = False
        self.deposed.set()
        node = self.node
        log.warning("%s: stepping down from epoch %d: %s", node.node_id, self.epoch, reason)
        if was_serving:
            node._stats["stepped_down"] += 1
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()
        for link in self.links.values():
            link.stop()
        for seq, p in list(self.pending.items()):
            p.finish(Code.OUTCOME_UNKNOWN, None, seq)  # appended: may yet commit elsewhere
        self.pending.clear()
        for w in self.reads + self.reads_before_barrier:
            w.finish(Code.NO_LEADER, None)
        self.reads, self.reads_before_barrier = [], []
        node._on_deposed(self)


# --- The node ---------------------------------------------------------------------------------------

class ZkNode:
    """One replica in zk-election mode, with the interface `raftpay.server.Server` uses.

    `peers` maps the *other* nodes' ids to their replication addresses (their `raft_addr`).
    `quorum` is "all" (every ISR member acknowledges) or "majority" (of the configured cluster).
    `fsync` is "always" (a batch is on disk before it is acknowledged or counted) or "never".
    `on_apply(index, ts, replies)` runs on the node's thread after each batch is applied here.
    """

    def __init__(self, node_id: str, raft_addr: str, client_addr: str, peers: dict[str, str],
                 data_dir: str, *, zk_hosts: str, cluster: str, root: str = "/raftpay",
                 digest: str | None = None, quorum: str = "all", session_timeout_ms: int = 4000,
                 secret: str | None = None, fsync: str = "always", session_ttl_ms: int = 600_000,
                 on_apply: Callable[[int, int, list], None] | None = None,
                 propose_timeout_s: float = 30.0, read_timeout_s: float | None = None,
                 ledger_cls=None, new_data_dir: bool = True):
        if quorum not in QUORUMS:
            raise ValueError(f"quorum must be one of {QUORUMS}, not {quorum!r}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, not {fsync!r}")
        if node_id in peers:
            raise ValueError(f"peers must list the other nodes only, not {node_id!r} itself")
        self.node_id = node_id
        self.raft_addr = raft_addr
        self.client_addr = client_addr
        self.peers = dict(peers)
        self.data_dir = data_dir
        self.quorum = quorum
        self.fsync = fsync
        self._new_data_dir = new_data_dir  # may claim an empty data dir (`claim_data_dir`)
        self.majority = (len(peers) + 1) // 2 + 1
        self.session_timeout_s = session_timeout_ms / 1000
        # A member that holds a batch up this long leaves the ISR: as long as ZooKeeper takes
        # to declare a silent node dead, so a crashed member costs the same either way.
        self.lag_timeout_s = self.session_timeout_s
        self._op_timeout_s = max(0.5, self.session_timeout_s / 2)
        self._propose_timeout_s = propose_timeout_s
        self._read_timeout_s = read_timeout_s or 2 * self.session_timeout_s
        self._zk_hosts = zk_hosts
        self._root = root
        self._cluster = cluster
        self._digest = digest
        self._secret = secret or None
        self._session_ttl_ms = session_ttl_ms
        self._on_apply = on_apply
        if ledger_cls is None:
            from raftpay.ledger import Ledger as ledger_cls
        self._ledger_cls = ledger_cls
        self._election_path = election_path(root, cluster)
        self._members_path = f"{cluster_path(root, cluster)}/members"
        self._isr_path = isr_path(root, cluster)

        self._lock = threading.Lock()  # guards the ledger (apply on the loop, query anywhere)
        self._ledger = None
        self._logfile = _LogFile(os.path.join(data_dir, LOG_FILE), fsync == "always")
        self._dir_lock = -1  # fd of the data dir's LOCK while started (`claim_data_dir`)
        self._complaints = PeerComplaints(log)  # misconfigured peers, once a minute each
        # Owned by the loop thread (read elsewhere only as single attributes).
        self._log: list[tuple[int, bytes]] = []  # batch seq i is self._log[i - 1]
        self._promised = 0
        self._commit = 0
        self._applied = 0
        self._role = "follower"
        self._leader_id: str | None = None
        self._leader_chan: _Channel | None = None
        self._follow_epoch = 0
        #: A node that lost its data (`raftpay node init --rejoin`): it does not stand for
        #: primary, and no primary counts its report, until it holds what was committed
        #: (`_advance_commit`).  Its cluster id for the NODE file it then rewrites.
        self._rejoining = False
        self._cluster_id = cluster_id(cluster, [node_id, *peers])
        self._matched = 0  # follower: batches up to here equal the current primary's
        self._primary: _Primary | None = None
        self._members: set[str] = set()
        self._zk_state = "not started"
        self._my_znode: str | None = None
        self._my_session: int | None = None
        self._applied_waiters: list = []
        self._wait_seq = itertools.count()
        self._fatal: BaseException | None = None
        self._stats = {"elections_won": 0, "stepped_down": 0, "fenced": 0}
        self._peer_view: dict = {}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._conns: set[_Channel] = set()
        self._zk = None
        self._zk_signal: _Signal | None = None
        self._mirror: ZkMirror | None = None
        self._stopping = False
        self._started = False

    @classmethod
    def from_config(cls, cfg, *, on_apply=None, new_data_dir: bool = True) -> "ZkNode":
        """A node from a validated `NodeConfig` (`[zk]` and `[raft] fsync` apply)."""
        return cls(cfg.node.id, cfg.node.raft_addr, cfg.node.client_addr,
                   {p.id: p.raft_addr for p in cfg.other_peers}, cfg.node.data_dir,
                   zk_hosts=cfg.zk.hosts, cluster=cfg.cluster.name, root=cfg.zk.root,
                   digest=cfg.zk.digest or None, quorum=cfg.zk.quorum,
                   session_timeout_ms=cfg.zk.session_timeout_ms,
                   secret=cfg.cluster.secret or None, fsync=cfg.raft.fsync,
                   session_ttl_ms=cfg.ledger.session_ttl_ms, on_apply=on_apply,
                   new_data_dir=new_data_dir)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Replay the log file into a fresh ledger, bind the replication port, then join
        ZooKeeper (membership, election).  Blocks briefly (caller's thread); returns before
        ZooKeeper answers.  Raises `FatalNodeError` if the log cannot be replayed,
        `raftpay.node.FatalNodeError` if another node holds the data dir or it is another
        node's, `OSError` if the port is taken.  Not restartable: make a new `ZkNode`."""
        if self._started:
            raise RuntimeError("a ZkNode starts once; create a new one to restart")
        self._started = True
        os.makedirs(self.data_dir, exist_ok=True)
        # Before the log is opened: two nodes appending to one log would interleave batches,
        # and another node's log holds epochs it promised, not ours.
        self._dir_lock, owner = claim_data_dir(
            self.data_dir, self.node_id, self._cluster_id, self._logfile.fsync,
            create=self._new_data_dir, mode="zk-election")
        self._rejoining = bool(owner.get("rejoin"))
        try:
            self._replay_and_bind()
        except BaseException:
            self._logfile.close()
            self._release_dir()
            raise
        self._join_zookeeper()

    def _replay_and_bind(self) -> None:
        self._ledger = self._ledger_cls(session_ttl_ms=self._session_ttl_ms)
        self._promised, self._log, commit = self._logfile.load()
        self._apply_to(commit)
        self._commit = self._matched = commit
        log.info("%s: replayed %d batches (applied %d, promised epoch %d)", self.node_id,
                 len(self._log), self._applied, self._promised)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,),
                                        name=f"zknode-{self.node_id}", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._bind(), self._loop).result(10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise

    def _join_zookeeper(self) -> None:
        self._zk = make_client(self._zk_hosts, session_timeout_s=self.session_timeout_s,
                               op_timeout_s=self._op_timeout_s, digest=self._digest)
        self._zk.add_listener(self._on_zk_state_thread)
        self._zk.start_async()
        # Membership (and, while we lead, /leader) is published by the same mirror Raft mode
        # uses; we join it only now that the replication port answers.
        self._mirror = ZkMirror(self._zk_hosts, self._cluster, self.node_id, self._mirror_view,
                                root=self._root, digest=self._digest,
                                session_timeout_s=self.session_timeout_s).start()
        asyncio.run_coroutine_threadsafe(self._start_tasks(), self._loop).result(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Step down (pending proposals OUTCOME_UNKNOWN, reads NO_LEADER, waits READ_NOT_READY),
        leave ZooKeeper (our znodes vanish at once), close the port and the log.  Blocks up to
        about `timeout_s`.  Idempotent."""
        if not self._started or self._stopping or self._loop is None:
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout_s)
        except Exception:
            log.exception("%s: shutdown", self.node_id)
        # Closing the election session first lets the next node take over without waiting
        # for a session timeout.
        if self._zk is not None:
            _close_client(self._zk, timeout_s / 3)
        if self._mirror is not None:
            self._mirror.stop(timeout_s / 3)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s / 3)
        self._logfile.close()
        self._release_dir()

    def _release_dir(self) -> None:
        fd, self._dir_lock = self._dir_lock, -1
        if fd >= 0:
            os.close(fd)

    def _run_loop(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._zk_signal = _Signal(self._loop)
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _bind(self) -> None:
        host, port = parse_addr(self.raft_addr)
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True,
                                                  limit=2 ** 20)

    async def _start_tasks(self) -> None:
        for coro in (self._elect(), self._watch_members(), self._ticker()):
            self._tasks.append(asyncio.ensure_future(coro))

    async def _shutdown(self) -> None:
        if self._primary is not None:
            self._primary.depose("stopping")
        for _, _, w in self._applied_waiters:
            w.finish(Code.READ_NOT_READY, self._applied)
        self._applied_waiters = []
        if self._server is not None:
            self._server.close()
        for chan in list(self._conns):
            chan.close()
        # Everything else on this loop (election, links, peer connections) ends here, so the
        # loop closes without abandoned tasks.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.wait(others, timeout=2.0) if others else None

    # --- public interface (any thread) -------------------------------------------------------

    def propose(self, payload: bytes, callback: Callable[[Code, list | None, int | None], None],
                timeout_s: float | None = None, decoded: tuple | None = None) -> None:
        """Replicate `payload` (``msgpack.packb([ts, commands])``) and call
        ``callback(code, replies, index)`` exactly once: OK with the ledger's replies after the
        quorum acknowledged the batch and this primary applied it; NOT_LEADER / NO_LEADER when
        this node is not a serving primary (nothing was appended); OUTCOME_UNKNOWN when it was
        appended but the node stepped down or `timeout_s` passed first — it may still commit, so
        retry with the same ids.  Any thread; never blocks; the callback runs on the node's
        thread, or inline when refused up front.  ValueError on a malformed payload (misuse).
        `decoded`: as `raftpay.node.Node.propose` (the primary applies those objects instead of
        unpacking the batch again)."""
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError("payload must be msgpack bytes")
        if decoded is None:
            try:
                ts, commands = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except Exception:
                raise ValueError("payload must be msgpack [ts, commands]") from None
        else:
            ts, commands = decoded
        if type(ts) is not int or type(commands) is not list:
            raise ValueError("payload must be msgpack [ts: int, commands: list]")
        p = _Proposal(callback)
        payload = bytes(payload)
        if decoded is not None:
            p.decoded = (payload, decoded)
        if self._stopping or self._loop is None or self._fatal is not None:
            p.finish(Code.NO_LEADER, None, None)
            return
        self._loop.call_soon_threadsafe(self._on_propose, payload, p,
                                        self._propose_timeout_s if timeout_s is None else timeout_s)

    def read_index(self, callback: Callable[[Code, int | None], None],
                   timeout_s: float | None = None) -> None:
        """Linearizable read barrier: ``callback(OK, index)`` once the quorum confirmed that this
        primary's epoch is still the newest, after this call, and it has applied `index` (its
        commit point at the call).  NOT_LEADER / NO_LEADER otherwise or after `timeout_s`.  Any
        thread; never blocks; callback on the node's thread."""
        w = _Waiter(callback)
        if self._stopping or self._loop is None:
            w.finish(Code.NO_LEADER, None)
            return
        self._loop.call_soon_threadsafe(self._on_read, w, timeout_s or self._read_timeout_s)

    def wait_applied(self, index: int, timeout_s: float,
                     callback: Callable[[Code, int], None]) -> None:
        """``callback(OK, applied)`` once this replica applied `index`, or
        ``callback(READ_NOT_READY, applied)`` after `timeout_s`.  Any thread; never blocks;
        inline when already applied."""
        w = _Waiter(callback, index)
        applied = self._applied
        if applied >= index:
            w.finish(Code.OK, applied)
            return
        if self._stopping or self._loop is None:
            w.finish(Code.READ_NOT_READY, applied)
            return
        self._loop.call_soon_threadsafe(self._on_wait, w, timeout_s)

    def query(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(ledger)`` under the ledger lock.  Any thread; blocks while a batch is being
        applied.  `fn` must only read.  Pair with `read_index` or `wait_applied`."""
        with self._lock:
            return fn(self._ledger)

    def state_hash(self) -> str:
        with self._lock:
            return self._ledger.state_hash()

    @property
    def leader_id(self) -> str | None:
        """The primary as this node last heard (itself while it leads or syncs), or None.
        A hint."""
        return self._leader_id

    def runs_on(self, loop) -> bool:
        """False: callbacks come from this node's own threads (see `server.Server`)."""
        return False

    def is_leader(self) -> bool:
        """True while this node is a serving primary.  A hint: `propose` decides."""
        pr = self._primary
        return pr is not None and pr.serving and self._zk_state == KazooState.CONNECTED

    def status(self) -> dict:
        """A point-in-time view (any thread; fields may be from adjacent moments)."""
        pr = self._primary
        st = {"id": self.node_id, "mode": "zk-election", "raft_addr": self.raft_addr,
              "role": self._role, "term": self._promised,
              "epoch": pr.epoch if pr is not None else None,
              "commit_index": self._commit, "applied_index": self._applied,
              "last_log_index": len(self._log), "leader_id": self._leader_id,
              "quorum": self.quorum, "fsync": self.fsync, "zk_state": self._zk_state,
              "running": self._started and not self._stopping,
              "fatal": None if self._fatal is None else repr(self._fatal),
              "log_syncs": self._logfile.syncs, "ready": self._leader_id is not None,
              "rejoining": self._rejoining}
        st.update(self._stats)
        st.update(self._peer_view)
        return st

    # --- loop-side entry points ---------------------------------------------------------------

    def _redirect_code(self) -> Code:
        other = self._leader_id is not None and self._leader_id != self.node_id
        return Code.NOT_LEADER if other else Code.NO_LEADER

    def _on_propose(self, payload: bytes, p: _Proposal, timeout_s: float) -> None:
        pr = self._primary
        if pr is None or not pr.serving or self._zk_state != KazooState.CONNECTED:
            p.finish(self._redirect_code(), None, None)
            return
        seq = self._append_local([(pr.epoch, payload)])
        p.index = seq
        p.appended_at = time.monotonic()
        pr.pending[seq] = p
        p.timer = self._loop.call_later(timeout_s, self._expire_proposal, pr, seq)
        pr.wake_links()
        pr.maybe_commit()

    def _expire_proposal(self, pr: _Primary, seq: int) -> None:
        p = pr.pending.pop(seq, None)
        if p is not None:
            p.timer = None
            p.finish(Code.OUTCOME_UNKNOWN, None, seq)

    def _on_read(self, w: _Waiter, timeout_s: float) -> None:
        pr = self._primary
        if pr is None or not pr.serving or self._zk_state != KazooState.CONNECTED:
            w.finish(self._redirect_code(), None)
            return
        w.timer = self._loop.call_later(timeout_s, w.finish, Code.NO_LEADER, None)
        pr.start_read(w)

    def _on_wait(self, w: _Waiter, timeout_s: float) -> None:
        if self._applied >= w.index:
            w.finish(Code.OK, self._applied)
            return
        heapq.heappush(self._applied_waiters, (w.index, next(self._wait_seq), w))
        w.timer = self._loop.call_later(timeout_s, lambda: w.finish(Code.READ_NOT_READY,
                                                                    self._applied))

    # --- the log and the state machine (loop thread) -----------------------------------------

    @property
    def last_seq(self) -> int:
        return len(self._log)

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of batch `seq` (0 for seq 0), or None beyond our log."""
        if seq == 0:
            return 0
        if seq > len(self._log):
            return None
        return self._log[seq - 1][0]

    def _append_local(self, records: list[tuple[int, bytes]], commit: int | None = None) -> int:
        """Append batches (durably, per the fsync policy), optionally with a commit mark in the
        same write; returns the new last seq."""
        base = len(self._log)
        out = [["B", e, base + i + 1, p] for i, (e, p) in enumerate(records)]
        if commit is not None:
            out.append(["C", commit])
        self._logfile.write(out)
        self._log.extend(records)
        return len(self._log)

    def _truncate(self, after: int) -> None:
        """Drop batches after `after`.  Only uncommitted, unapplied batches may go."""
        if after < self._commit or after < self._applied:
            self._fail(FatalNodeError(f"asked to truncate to {after}, below commit "
                                      f"{self._commit} / applied {self._applied}"))
        if after < len(self._log):
            log.info("%s: truncating uncommitted batches %d..%d", self.node_id, after + 1,
                     len(self._log))
            self._logfile.write([["T", after]], sync=False)  # synced with the next append
            del self._log[after:]
            self._matched = min(self._matched, after)

    def _promise(self, epoch: int) -> None:
        """Remember (durably) that we follow nothing older than `epoch`."""
        if epoch <= self._promised:
            return
        self._promised = epoch
        self._logfile.write([["E", epoch]])
        pr = self._primary
        if pr is not None and pr.epoch < epoch:
            pr.depose(f"a newer primary (epoch {epoch}) contacted us")

    def _advance_commit(self, commit: int, mark: bool = True) -> None:
        commit = min(commit, len(self._log))
        if commit <= self._commit:
            return
        self._commit = commit
        if mark:
            self._logfile.write([["C", commit]], sync=False)
        self._apply_to(commit)
        if self._rejoining and self.epoch_at(commit) == self._follow_epoch:
            self._end_rejoin()

    def _end_rejoin(self) -> None:
        """A batch of the current primary's epoch is committed here: the primary's barrier,
        committed after it fetched everything committed before, and our log matches its up
        to there.  So we hold what was committed: stand and count again (Raft mode's rule,
        `Node._end_rejoin`).  The NODE file loses its mark first."""
        if not clear_rejoin_mark(self.data_dir, self.node_id, self._logfile.fsync,
                                 self._cluster_id):
            return
        self._rejoining = False
        log.info("%s: caught up after rejoining (commit %d, epoch %d): stands and counts again",
                 self.node_id, self._commit, self._follow_epoch)

    def _apply_to(self, target: int) -> None:
        pr = self._primary
        while self._applied < target:
            seq = self._applied + 1
            payload = self._log[seq - 1][1]
            p = pr.pending.get(seq) if pr is not None else None
            try:
                if p is not None and p.decoded is not None and p.decoded[0] is payload:
                    ts, commands = p.decoded[1]  # this primary's own batch, never unpacked
                else:
                    ts, commands = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                with self._lock:
                    replies = self._ledger.apply_entry(commands, ts)
            except Exception as e:
                # Every replica would stop at the same batch; skipping it would diverge.
                self._fail(FatalNodeError(f"cannot apply batch {seq}: {e!r}"))
            self._applied = seq
            if self._on_apply is not None:
                _call(self._on_apply, seq, ts, replies)
            if pr is not None:
                p = pr.pending.pop(seq, None)
                if p is not None:
                    p.finish(Code.OK, replies, seq)
        while self._applied_waiters and self._applied_waiters[0][0] <= self._applied:
            heapq.heappop(self._applied_waiters)[2].finish(Code.OK, self._applied)

    def _fail(self, e: FatalNodeError) -> None:
        """Stop taking part: step down and leave the election, keep answering status."""
        log.critical("%s: %s", self.node_id, e)
        self._fatal = e
        if self._primary is not None:
            self._primary.depose(str(e))
        if self._loop is not None and self._zk is not None:
            threading.Thread(target=_close_client, args=(self._zk, 5.0), daemon=True).start()
        raise e

    # --- follower side: messages from primaries (loop thread) ---------------------------------

    async def _accept(self, reader, writer) -> None:
        chan = None
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan = await _handshake(reader, writer, initiator=False, my_id=self.node_id,
                                    secret=self._secret, client_port=self.client_addr)
            if chan.peer_id not in self.peers:
                raise ProtocolError(f"unknown node {chan.peer_id!r}")
            self._conns.add(chan)
            while True:
                m = await chan.recv()
                reply = self._handle(m, chan)
                if reply is not None:
                    chan.write(reply)
                    await chan.writer.drain()
        except ProtocolError as e:  # a peer misconfigured, not one that is down
            peer = chan.peer_id if chan is not None else None
            self._complaints.warn((peer, str(e)), f"{self.node_id}: peer connection: {e}")
        except (OSError, ConnectionError, asyncio.TimeoutError, TimeoutError,
                asyncio.IncompleteReadError) as e:
            log.debug("%s: peer connection: %r", self.node_id, e)
        except (FatalNodeError, asyncio.CancelledError):
            pass  # logged where it happened / we are stopping
        except Exception:
            log.exception("%s: peer connection failed", self.node_id)
        finally:
            if chan is not None:
                self._conns.discard(chan)
                if self._leader_chan is chan:
                    # The primary went away (crashed or stepped down): no hint until the next
                    # one contacts us, so clients back off instead of chasing a dead node.
                    self._leader_chan = None
                    if self._primary is None:
                        self._leader_id = None
            writer.close()

    def _stale(self, epoch: int) -> dict | None:
        if epoch < self._promised:
            self._stats["fenced"] += 1
            return {"t": "nack", "why": "stale", "promised": self._promised}
        return None

    def _handle(self, m: dict, chan: _Channel) -> dict | None:
        kind, epoch = m.get("t"), m.get("e")
        if type(epoch) is not int:
            raise ProtocolError(f"message without an epoch: {kind!r}")
        stale = self._stale(epoch)
        if stale is not None:
            return stale
        self._promise(epoch)  # steps our own primary down if this one is newer
        if self._primary is not None:
            # Same epoch as our own leadership from another node: cannot happen (one znode,
            # one epoch); refuse rather than guess.
            raise ProtocolError(f"{chan.peer_id} speaks for our own epoch {epoch}")
        if epoch != self._follow_epoch:
            self._follow_epoch = epoch
            self._matched = self._commit  # the committed prefix matches any newer primary
        if kind == "hello":
            self._leader_id, self._leader_chan = chan.peer_id, chan
            return {"t": "welcome", "last_epoch": self.epoch_at(len(self._log)),
                    "last_seq": len(self._log), "commit": self._commit,
                    "rejoining": self._rejoining}
        if kind == "append":
            return self._on_append(m)
        if kind == "commit":
            self._advance_commit(min(m["c"], self._matched))
            return None
        if kind == "ping":
            return {"t": "pong", "r": m["r"]}
        if kind == "fetch":
            return self._on_fetch(m)
        raise ProtocolError(f"unknown message {kind!r}")

    def _on_append(self, m: dict) -> dict:
        trunc = m.get("trunc")
        if trunc is not None:
            if trunc < self._applied:
                log.error("%s: primary asks to truncate to %d below applied %d", self.node_id,
                          trunc, self._applied)
                return {"t": "nack", "why": "resync"}
            self._truncate(trunc)
        prev, prev_epoch, recs = m["prev"], m["pe"], m["recs"]
        if prev > len(self._log) or self.epoch_at(prev) != prev_epoch:
            return {"t": "nack", "why": "resync"}
        new: list[tuple[int, bytes]] = []
        for i, (epoch, payload) in enumerate(recs):
            seq = prev + 1 + i
            if not new and seq <= len(self._log):
                if self._log[seq - 1][0] == epoch:
                    continue  # a re-sent batch we hold: dropped by its sequence number
                self._truncate(seq - 1)
            new.append((epoch, bytes(payload)))
        matched = prev + len(recs)
        self._matched = max(self._matched, matched)
        commit = min(m["c"], self._matched)
        if new:
            self._append_local(new, commit if commit > self._commit else None)
            self._advance_commit(commit, mark=False)
        else:
            self._advance_commit(commit)
        return {"t": "ack", "s": matched}

    def _on_fetch(self, m: dict) -> dict:
        after, after_epoch = m["after"], m["ae"]
        if after > len(self._log) or self.epoch_at(after) != after_epoch:
            return {"t": "mismatch"}
        recs, size, i = [], 0, after + 1
        while i <= len(self._log) and len(recs) < CATCHUP_CHUNK_RECORDS and \
                size < CATCHUP_CHUNK_BYTES:
            epoch, payload = self._log[i - 1]
            recs.append([epoch, payload])
            size += len(payload)
            i += 1
        return {"t": "batches", "recs": recs}

    # --- primary side helpers --------------------------------------------------------------

    async def _connect(self, addr: str, peer_id: str) -> _Channel:
        host, port = parse_addr(addr)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=2 ** 20), CONNECT_TIMEOUT_S)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan = await _handshake(reader, writer, initiator=True, my_id=self.node_id,
                                    secret=self._secret)
            if chan.peer_id != peer_id:
                raise ProtocolError(f"{addr} is {chan.peer_id!r}, expected {peer_id!r}")
            return chan
        except BaseException:
            writer.close()
            raise

    def _on_deposed(self, pr: _Primary) -> None:
        if self._primary is pr:
            self._primary = None
            self._role = "follower"
            self._leader_id = None
            self._matched = self._commit

    # --- ZooKeeper (loop thread unless said otherwise) ----------------------------------------

    def _zk_call(self, async_result, timeout_s: float | None = None):
        """Await a kazoo async call from the loop, bounded by the op timeout."""
        loop = self._loop
        fut = loop.create_future()

        def settle(res) -> None:  # kazoo's thread
            def done() -> None:
                if fut.done():
                    return
                try:
                    fut.set_result(res.get(block=False))
                except Exception as e:
                    fut.set_exception(e)

            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:
                pass  # the loop is gone: we are stopping

        async_result.rawlink(settle)
        return asyncio.wait_for(fut, timeout_s or self._op_timeout_s)

    def _on_zk_state_thread(self, state: str) -> None:
        # kazoo's connection thread: hand over, never call ZooKeeper here.
        try:
            self._loop.call_soon_threadsafe(self._on_zk_state, state)
        except RuntimeError:
            pass

    def _on_zk_state(self, state: str) -> None:
        self._zk_state = state
        if state != KazooState.CONNECTED and self._primary is not None:
            # SUSPENDED: the session may expire and another node may win; LOST: it has.  Either
            # way we can no longer be sure we lead, so we stop now.
            self._primary.depose(f"ZooKeeper connection {state}")
        if state == KazooState.LOST:
            self._my_znode = None
        self._zk_signal.fire()

    def _mirror_view(self) -> dict:
        return {"client_addr": self.client_addr, "role": self._role, "term": self._promised}

    async def _read_isr(self) -> tuple[set[str] | None, int]:
        try:
            data, stat = await self._zk_call(self._zk.get_async(self._isr_path))
        except NoNodeError:
            return None, -1
        try:
            isr = set(json.loads(data)["isr"])
        except (ValueError, KeyError, TypeError):
            log.error("%s: unreadable ISR %r; treating it as empty", self.node_id, data)
            isr = set()
        return isr, stat.version

    async def _write_isr(self, isr: set[str], epoch: int, version: int) -> int:
        """Compare-and-set the ISR znode at `version` (-1: create it); returns the new version."""
        data = json.dumps({"isr": sorted(isr), "epoch": epoch, "primary": self.node_id},
                          sort_keys=True).encode()
        if version < 0:
            await self._zk_call(self._zk.create_async(self._isr_path, data, makepath=True))
            return 0
        stat = await self._zk_call(self._zk.set_async(self._isr_path, data, version=version))
        return stat.version

    async def _ensure_candidate(self) -> str:
        """Our election znode in the current session, created if needed.  The name carries a
        fresh nonce so that after a lost reply we find the znode we did create."""
        session = self._zk.client_id[0] if self._zk.client_id else None
        if self._my_znode is not None and self._my_session == session:
            return self._my_znode
        prefix = f"{self.node_id}-{uuid.uuid4().hex[:12]}-"
        data = json.dumps({"node_id": self.node_id, "raft_addr": self.raft_addr}).encode()
        try:
            path = await self._zk_call(self._zk.create_async(
                f"{self._election_path}/{prefix}", data, ephemeral=True, sequence=True,
                makepath=True))
        except (KazooException, asyncio.TimeoutError, TimeoutError):
            children = await self._zk_call(self._zk.get_children_async(self._election_path))
            ours = [c for c in children if c.startswith(prefix)]
            if not ours:
                raise
            path = f"{self._election_path}/{ours[0]}"
        self._my_znode, self._my_session = path, session
        return path

    async def _elect(self) -> None:
        """The herd-free election: lead when our znode is the smallest, else watch only our
        predecessor."""
        while not self._stopping:
            if self._zk_state != KazooState.CONNECTED or self._fatal is not None:
                await _first(self._zk_signal.wait(), timeout_s=1.0)
                continue
            if self._rejoining:  # it may not stand yet
                await asyncio.sleep(0.1)
                continue
            try:
                znode = await self._ensure_candidate()
                children = await self._zk_call(self._zk.get_children_async(self._election_path))
                mine = znode.rsplit("/", 1)[1]
                if mine not in children:
                    self._my_znode = None  # our session lost it
                    continue
                order = sorted(children, key=_seq_of)
                i = order.index(mine)
                if i == 0:
                    await self._lead(_epoch_of(mine))
                    await asyncio.sleep(0.05)  # let ZooKeeper state settle before re-checking
                    continue
                fired = self._loop.create_future()
                state = self._zk_signal.wait()

                def on_event(_event, fired=fired) -> None:  # kazoo's thread
                    try:
                        self._loop.call_soon_threadsafe(
                            lambda: fired.done() or fired.set_result(None))
                    except RuntimeError:
                        pass

                stat = await self._zk_call(self._zk.exists_async(
                    f"{self._election_path}/{order[i - 1]}", watch=on_event))
                if stat is None:
                    continue
                await _first(fired, state)
            except asyncio.CancelledError:
                raise
            except FatalNodeError:
                return
            except (KazooException, asyncio.TimeoutError, TimeoutError) as e:
                log.info("%s: election: %r", self.node_id, e)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("%s: election step failed", self.node_id)
                await asyncio.sleep(0.5)

    async def _lead(self, epoch: int) -> None:
        if epoch < self._promised:
            # Cannot happen (a later primary has a larger sequence number); if it does, take a
            # fresh znode at the back of the queue rather than lead with an old epoch.
            log.error("%s: elected with epoch %d below promised %d; re-joining", self.node_id,
                      epoch, self._promised)
            try:
                await self._zk_call(self._zk.delete_async(self._my_znode))
            except (KazooException, asyncio.TimeoutError, TimeoutError):
                pass
            self._my_znode = None
            return
        self._promise(epoch)
        pr = _Primary(self, epoch)
        self._primary = pr
        self._role = "candidate"
        self._leader_id = self.node_id
        self._stats["elections_won"] += 1
        log.info("%s: elected with epoch %d; syncing", self.node_id, epoch)
        try:
            await pr.run()
        finally:
            pr.depose("leadership ended")

    async def _watch_members(self) -> None:
        """Keep `_members` (the configured peers listed under /members) current."""
        while not self._stopping:
            if self._zk_state != KazooState.CONNECTED:
                await _first(self._zk_signal.wait(), timeout_s=1.0)
                continue
            fired = self._loop.create_future()
            state = self._zk_signal.wait()

            def on_event(_event, fired=fired) -> None:  # kazoo's thread
                try:
                    self._loop.call_soon_threadsafe(lambda: fired.done() or fired.set_result(None))
                except RuntimeError:
                    pass

            try:
                await self._zk_call(self._zk.ensure_path_async(self._members_path))
                children = await self._zk_call(
                    self._zk.get_children_async(self._members_path, watch=on_event))
            except asyncio.CancelledError:
                raise
            except (KazooException, asyncio.TimeoutError, TimeoutError) as e:
                log.info("%s: members: %r", self.node_id, e)
                await asyncio.sleep(0.2)
                continue
            members = {c for c in children if c in self.peers}
            unknown = set(children) - members - {self.node_id}
            if unknown:
                log.warning("%s: ignoring members not in cluster.peers: %s", self.node_id,
                            sorted(unknown))
            if members != self._members:
                self._members = members
                if self._primary is not None:
                    self._primary.on_members(members)
            await _first(fired, state, timeout_s=5.0)

    async def _ticker(self) -> None:
        """Lag checks and the status snapshot, every 50 ms."""
        while True:
            await asyncio.sleep(0.05)
            pr = self._primary
            if pr is not None:
                pr.check_lag(time.monotonic())
                self._peer_view = {
                    "isr": sorted(pr.isr_zk) if self.quorum == "all" else None,
                    "peers": {pid: {"connected": l.connected, "acked": l.acked,
                                    "lag": len(self._log) - l.acked,
                                    "counted": pid in pr.counted()}
                              for pid, l in list(pr.links.items())},
                    "members": sorted(self._members)}
            else:
                self._peer_view = {"members": sorted(self._members)}


# --- The node process -------------------------------------------------------------------------------

async def serve(cfg, *, stop: asyncio.Event | None = None, on_ready=None) -> None:
    """Run one zk-election node from a validated `NodeConfig` until `stop` is set (or SIGTERM /
    SIGINT): the `ZkNode`, its clock, and the same client server as Raft mode.

    Blocks (it is the process's main coroutine).  Stops cleanly: the server closes first, then
    the node steps down, leaves ZooKeeper and closes its log.
    """

    from raftpay.clock import HLC
    from raftpay.server import Server, ServerSettings, _observe, stop_on_signals

    hlc = HLC(max_offset_ms=cfg.clock.max_offset_ms)
    # `raftpay node init` makes a new node's dir (`raftpay.node.claim_data_dir`).
    node = ZkNode.from_config(cfg, on_apply=lambda index, ts, replies: _observe(hlc, ts),
                              new_data_dir=False)
    by_id = {p.id: p.client_addr for p in cfg.cluster.peers}
    server = Server(node, stamp=hlc.now, client_addr_of=by_id.get,
                    settings=ServerSettings.from_config(cfg),
                    extra_status=lambda: {"client_addr": cfg.node.client_addr,
                                          "members": by_id, "hlc": hlc.peek(),
                                          "zk": node._mirror.status() if node._mirror else None})
    stop = stop_on_signals(stop)
    loop = asyncio.get_running_loop()
    node.start()
    try:
        host, port = parse_addr(cfg.node.client_addr)
        await server.start(host, port)
        log.info("node %s (zk-election, quorum %s) serving clients on %s", cfg.node.id,
                 cfg.zk.quorum, cfg.node.client_addr)
        if on_ready:
            on_ready(server)
        await stop.wait()
    finally:
        await server.stop()
        await loop.run_in_executor(None, node.stop)


__all__ = ["ZkNode", "serve", "election_path", "isr_path", "FatalNodeError", "LOG_FILE"]

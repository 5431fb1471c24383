"""One replica: a `Ledger` hosted in a PySyncObj Raft group.

Design.  The node is a thin wrapper around the state machine (rqlite `store/` is the model):
a proposal is a msgpack payload ``[ts, commands]`` that the leader appends to the Raft log; every
replica applies committed entries in log order as ``ledger.apply_entry(commands, ts)`` under one
ledger lock, and the proposing leader's callback fires after that apply, never before.  This is
the only module that imports PySyncObj, and every reach into its internals lives in the fenced
section "ADAPTER OVER PYSYNCOBJ 0.3.17 INTERNALS" below, pinned name by name by
`tests/test_raft_adapter.py`.  The adapter exists for five reasons, each a gap in PySyncObj 0.3.17
(see /work/shared/ENGINE_NOTES.md):

* Latency: upstream sends appendEntries once per period (~125 ms a command).  Here the node drives
  PySyncObj's tick itself; proposals are queued, and every tick appends *all* queued proposals
  and sends one appendEntries round at once (group commit without a timer).  The tick runs either
  on a Raft thread of the node's own (woken through a pipe in upstream's poller) or, as the node
  process runs it, on the asyncio loop that serves clients (`start(loop=...)`: upstream's sockets
  join the loop's selector through `_LoopPoller`), which removes the GIL hand-overs between two
  busy threads that made a commit round take ~12 ms under load.  Upstream also keeps the part of
  a message the socket did not take until its next send to that node (a heartbeat later); the
  adapter has the poller finish it as soon as the socket drains.
* Safety: upstream followers truncate entries they already hold and the leader moves nextIndex
  backwards on stale replies.  The adapter handles appendEntries as Raft §5.3 says (delete only a
  conflicting suffix, commit only what this message verified) and never moves nextIndex below
  matchIndex + 1.
* Durability: upstream never fsyncs.  With ``fsync="always"`` the log is synced once per append
  round before a follower acknowledges it and before the leader counts itself; term/vote and
  snapshots are written temp-fsync-rename-fsync(dir).
* Reads: upstream has no ReadIndex.  The adapter numbers appendEntries rounds, followers echo the
  number, and a read completes once a majority acknowledged a round that started after the read.
* Safety of the log format: our entries are raw msgpack bytes behind a type byte of our own, so
  applying the log never unpickles; followers never forward proposals (upstream forwarding
  pickles), and a node answers `NOT_LEADER` instead.

Threads.  Public methods are thread-safe and never block on Raft (except `start`, `stop`,
`wait_ready` and `query`, which say so).  Callbacks run on the thread that ticks (the Raft thread,
or the loop's thread in loop mode) unless a method says otherwise; they must be quick and must not
call `stop()` synchronously.  The asyncio server queues them into its loop, with `call_soon` when
the node ticks on that loop (`runs_on`) and `call_soon_threadsafe` otherwise.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterable

import msgpack

from .codes import Code

log = logging.getLogger(__name__)

#: Where a node keeps its files inside `data_dir`.
JOURNAL_FILE = "raft.journal"  # PySyncObj FileJournal; its term/vote live in "raft.journal.meta"
SNAPSHOT_FILE = "raft.snapshot"  # msgpack, written by `Node._write_snapshot`
SNAPSHOT_FORMAT = "raftpay-raft-snapshot"
SNAPSHOT_VERSION = 1

FSYNC_POLICIES = ("always", "never")

#: A leader tells followers a new commit index with its next appendEntries round; when no round
#: goes out for this long after a commit, it sends one for the commit alone.
COMMIT_NOTIFY_S = 0.002


class FatalNodeError(RuntimeError):
    """The replica cannot go on without risking divergence (the apply raised, a committed entry
    conflicts, a snapshot does not load).  The node stops; an operator must look."""


def _fsync_dir(path: str) -> None:
    """Make a rename or a create inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ==============================================================================================
# ADAPTER OVER PYSYNCOBJ 0.3.17 INTERNALS
#
# Everything between this banner and "END OF ADAPTER" depends on PySyncObj 0.3.17 exactly:
# name-mangled attributes (`self.__x` inside SyncObj is `self._SyncObj__x`), the shape of its
# messages, and the order of work in `SyncObj._onTick`.  A subclass method named
# `_SyncObj__foo` is called by SyncObj in place of its own `__foo`; we wrap where we can and
# replace only where upstream is wrong.  tests/test_raft_adapter.py pins every name used here;
# after an upgrade, run it first.
# ==============================================================================================

import pysyncobj  # noqa: E402  (kept inside the fence on purpose)
import pysyncobj.pickle as _pso_pickle  # noqa: E402
from pysyncobj import SyncObj, SyncObjConf  # noqa: E402
from pysyncobj.config import FAIL_REASON  # noqa: E402
from pysyncobj.journal import FileJournal, MetaStorer  # noqa: E402
from pysyncobj.monotonic import monotonic as _pso_monotonic  # noqa: E402  (CLOCK_MONOTONIC_RAW)
from pysyncobj.poller import POLL_EVENT_TYPE  # noqa: E402
from pysyncobj.syncobj import _RAFT_STATE  # noqa: E402
from pysyncobj.tcp_connection import TcpConnection  # noqa: E402
from pysyncobj.transport import TCPTransport  # noqa: E402
from pysyncobj.version import VERSION as _PYSYNCOBJ_VERSION  # noqa: E402

PYSYNCOBJ_VERSION = "0.3.17"
if _PYSYNCOBJ_VERSION != PYSYNCOBJ_VERSION:  # fail at import, not with a subtle divergence later
    raise ImportError(
        f"raftpay.node is written against pysyncobj=={PYSYNCOBJ_VERSION}, found "
        f"{_PYSYNCOBJ_VERSION}; review the adapter and run tests/test_raft_adapter.py")

#: The first byte of our log entries.  Upstream's own types are 0..3; an entry of a type it does
#: not know is skipped by its apply, so a raftpay entry can never reach upstream's unpickling path.
ENTRY_LEDGER = b"R"

#: Our own message between nodes: keeps idle follower<->follower links alive (`rp_ping_peers`).
_MSG_PING = "rp_ping"

#: PySyncObj FAIL_REASON -> our code.  Only SUCCESS and DISCARDED reach a callback in our design
#: (we never use upstream's queue or forwarding); the rest are mapped for completeness.
#: DISCARDED means a *different* entry was committed at our entry's index: by Raft's log matching
#: property ours can never commit, so nothing happened and the client may go to the new leader.
_FAIL_TO_CODE = {
    FAIL_REASON.SUCCESS: Code.OK,
    FAIL_REASON.QUEUE_FULL: Code.OVERLOADED,
    FAIL_REASON.MISSING_LEADER: Code.NO_LEADER,
    FAIL_REASON.NOT_LEADER: Code.NOT_LEADER,
    FAIL_REASON.DISCARDED: Code.NOT_LEADER,
    FAIL_REASON.LEADER_CHANGED: Code.OUTCOME_UNKNOWN,
    FAIL_REASON.REQUEST_DENIED: Code.OUTCOME_UNKNOWN,
    FAIL_REASON.UNKNOWN_OUTCOME: Code.OUTCOME_UNKNOWN,
}


class _DurableMetaStorer(MetaStorer):
    """Term and vote must be on disk before any message that relies on them leaves (Raft §5);
    upstream writes the temp file and renames it without an fsync."""

    def storeMeta(self, meta):
        path = self.getPath()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_pso_pickle.dumps(meta))  # upstream's format, so upstream can read it back
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")


class _RaftpayJournal(FileJournal):
    """Upstream's mmap journal plus a dirty flag, so the log is synced once per append round
    (`rp_sync`) instead of never.  `flush()` is `mmap.flush()`, i.e. msync(MS_SYNC), which on
    Linux syncs the file range and the size change like fdatasync."""

    def __init__(self, path: str, fsync: bool):
        self.rp_path = path
        super().__init__(path)
        self.rp_fsync = fsync
        self.rp_dirty = False
        self.rp_syncs = 0  # count of real syncs, for status and tests
        if fsync:
            self._FileJournal__metaStorer = _DurableMetaStorer(path + ".meta")

    def add(self, command, idx, term):
        super().add(command, idx, term)
        self.rp_dirty = True

    def clear(self):
        super().clear()
        self.rp_dirty = True

    def deleteEntriesFrom(self, entryFrom):
        super().deleteEntriesFrom(entryFrom)
        self.rp_dirty = True

    def deleteEntriesTo(self, entryTo):
        # Upstream calls this after a snapshot was renamed into place; the entries it drops exist
        # only in that snapshot from now on, so make the rename durable first.
        if self.rp_fsync:
            _fsync_dir(os.path.dirname(self.rp_path) or ".")
        super().deleteEntriesTo(entryTo)
        self.rp_dirty = True

    def rp_sync(self) -> None:
        if self.rp_dirty:
            self.rp_dirty = False
            if self.rp_fsync:
                self.rp_fsync_now()

    def rp_fsync_now(self) -> None:
        """The one place the log reaches the disk (tests wrap it to check the order).

        fdatasync on the journal's file, not upstream's `flush()` (`mmap.flush()`, msync):
        CPython holds the GIL across msync, which froze the asyncio server thread for every
        sync, while `os.fdatasync` releases it.  On Linux the page cache is unified, so
        fdatasync writes the pages dirtied through the mmap and the size change too.  The fd is
        looked up each time because upstream reopens the file when it grows it."""
        rfile = self._FileJournal__journalFile
        os.fdatasync(rfile._ResizableFile__f.fileno())
        self.rp_syncs += 1


#: First byte of every frame between raftpay nodes (`_RaftpayConnection`): which framing follows.
_FRAME_PLAIN = b"P"  # pickle, no secret configured (loopback only, enforced by the config)
_FRAME_SEALED = b"S"  # seq (8 bytes) | nonce (12) | AES-GCM(pickle), authenticated with the seq
#: Key derivation for the cluster secret; a salt of our own, so the key is not upstream's.
_SEAL_SALT = b"raftpay/raft-transport/aes-gcm/v1"
_I32 = struct.Struct("i")  # upstream's length prefix: a native int


class _Sealer:
    """Authenticated encryption of node-to-node frames with a key derived from the cluster
    secret (PBKDF2-SHA256, like upstream's Fernet key, then AES-256-GCM).

    Why not upstream's Fernet: per small message, zlib.compress (which upstream applies first)
    cost ~80 us and Fernet ~40 us each way, on every appendEntries and acknowledgement; AES-GCM
    costs ~3 us.  Replay protection is stronger too: each connection numbers its frames and the
    receiver accepts only increasing numbers (Fernet's second-resolution timestamps allowed
    replays within the same second), on top of upstream's per-connection random key."""

    def __init__(self, secret: str):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
        kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_SEAL_SALT,
                         iterations=100_000)
        self._aead = AESGCM(kdf.derive(secret.encode()))

    def seal(self, data: bytes, seq: int) -> bytes:
        head = _FRAME_SEALED + seq.to_bytes(8, "big")
        nonce = os.urandom(12)
        return head + nonce + self._aead.encrypt(nonce, data, head)

    def open(self, frame: bytes) -> tuple[int, bytes]:
        """(seq, plaintext); raises on anything not sealed with our key."""
        if frame[:1] != _FRAME_SEALED or len(frame) < 9 + 12 + 16:
            raise ValueError("not a sealed frame")
        head = frame[:9]
        return int.from_bytes(head[1:], "big"), self._aead.decrypt(frame[9:21], frame[21:], head)


class _SendQueue:
    """A connection's unsent bytes as a queue of frames plus an offset into the first.

    Upstream keeps them in one `bytes`, appending with `+=` and dropping what was sent with a
    slice: both copy everything left, so a snapshot streamed to a restarted follower (tens of
    MB in 64 KB chunks) took quadratic time and a restarted node took 10-30 s to catch up.
    Upstream only reads it with len() and truthiness, which this supports."""

    __slots__ = ("chunks", "offset", "size")

    def __init__(self, data: bytes = b""):
        self.chunks: collections.deque = collections.deque()
        self.offset = 0
        self.size = 0
        self.append(data)

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, data) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def peek(self, limit: int = 1 << 18):
        """The next bytes to send: the rest of the first frame, joined with the following ones
        up to `limit` so small frames still go in one syscall."""
        view = memoryview(self.chunks[0])[self.offset:]
        if len(view) >= limit or len(self.chunks) == 1:
            return view
        parts, total = [view], len(view)
        for chunk in itertools.islice(self.chunks, 1, None):
            if total >= limit:
                break
            parts.append(chunk)
            total += len(chunk)
        return b"".join(parts)

    def consume(self, n: int) -> None:
        self.size -= n
        while n:
            left = len(self.chunks[0]) - self.offset
            if n >= left:
                self.chunks.popleft()
                self.offset = 0
                n -= left
            else:
                self.offset += n
                n = 0


class _RaftpayConnection(TcpConnection):
    """Upstream's TCP connection with raftpay's framing: `pickle.dumps(message)` behind a type
    byte, sealed by `_Sealer` when the cluster has a secret — no zlib (~80 us a message to
    compress ~200 bytes on loopback), no Fernet.  The transport turns each connection it makes or
    accepts into this class before anything is sent on it (`rp_adopt`); every node of a cluster
    runs raftpay, so both ends speak it, and a peer that does not (or lacks the secret) fails the
    first frame and is disconnected.  Nothing is unpickled before it authenticates, when sealed.

    The length prefix is upstream's.  The buffers are not: unsent bytes are a `_SendQueue`, and
    received bytes a bytearray read from an offset (`rp_rpos`), so a large transfer costs linear
    time (upstream copied the whole buffer per send, per read and per message).
    `rp_send_seq`/`rp_recv_seq` number the frames of one TCP connection (reset on disconnect,
    since upstream reuses the object)."""

    @classmethod
    def rp_adopt(cls, conn: TcpConnection) -> TcpConnection:
        if type(conn) is TcpConnection:
            conn.__class__ = cls
            conn.rp_send_seq, conn.rp_recv_seq, conn.rp_rpos = 0, 0, 0
        return conn

    def send(self, message):
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = _pso_pickle.dumps(message)
        if self.encryptor:
            self.rp_send_seq += 1
            data = self.encryptor.seal(data, self.rp_send_seq)
        else:
            data = _FRAME_PLAIN + data
        queue = self._TcpConnection__writeBuffer
        if type(queue) is not _SendQueue:  # upstream resets it to bytes() on (dis)connect
            queue = self._TcpConnection__writeBuffer = _SendQueue(queue)
        queue.append(_I32.pack(len(data)))
        queue.append(data)
        self._TcpConnection__trySendBuffer()

    def _TcpConnection__processSend(self):
        queue = self._TcpConnection__writeBuffer
        if not queue:
            return False
        if type(queue) is not _SendQueue:
            queue = self._TcpConnection__writeBuffer = _SendQueue(queue)
        try:
            sent = self._TcpConnection__socket.send(queue.peek())
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sent <= 0:
            return False
        queue.consume(sent)
        return True

    def _TcpConnection__processRead(self):
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return False
        buf = self._TcpConnection__readBuffer
        if type(buf) is not bytearray:  # upstream resets it to bytes() on (dis)connect
            buf = self._TcpConnection__readBuffer = bytearray(buf)
            self.rp_rpos = 0
        buf += incoming
        return True

    def _TcpConnection__processParseMessage(self):
        buf = self._TcpConnection__readBuffer
        if type(buf) is not bytearray:
            if len(buf) < 4:
                return None
            buf = self._TcpConnection__readBuffer = bytearray(buf)
            self.rp_rpos = 0
        pos = self.rp_rpos
        if len(buf) - pos < 4:
            return None
        (n,) = _I32.unpack_from(buf, pos)
        if n < 0:
            log.warning("dropping a Raft connection: negative frame length")
            self.disconnect()
            return None
        if len(buf) - pos - 4 < n:
            return None
        data = bytes(buf[pos + 4:pos + 4 + n])
        # Consume before decoding (a failure disconnects, which resets the buffer anyway).
        pos += 4 + n
        if pos == len(buf):
            buf.clear()
            pos = 0
        elif pos > (1 << 20) and pos > len(buf) // 2:
            del buf[:pos]
            pos = 0
        self.rp_rpos = pos
        try:
            if self.encryptor:
                seq, data = self.encryptor.open(data)
                if seq <= self.rp_recv_seq:
                    raise ValueError(f"frame {seq} after {self.rp_recv_seq}: replayed")
                self.rp_recv_seq = seq
            elif data[:1] == _FRAME_PLAIN:
                data = data[1:]
            else:
                raise ValueError("sealed frame, but this node has no cluster secret")
            message = _pso_pickle.loads(data)
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception as e:
            log.warning("dropping a Raft connection: %s", e or type(e).__name__)
            self.disconnect()
            return None
        return message

    def disconnect(self):
        self.rp_send_seq, self.rp_recv_seq, self.rp_rpos = 0, 0, 0
        super().disconnect()


class _RaftpayTransport(TCPTransport):
    """Upstream's TCP transport with two stamps on outgoing Raft messages.

    * append_entries carries `rp_seq`, the leader's round number (for ReadIndex).
    * next_node_idx (a follower's acknowledgement) first makes the log durable, then carries the
      round it answers and the follower's term, so the leader counts only acks of its own term.
    Doing it here covers every code path that acknowledges, including upstream's snapshot
    install and chunked transmissions."""

    def addNode(self, node):
        super().addNode(node)  # makes the outgoing connection object, if we are the dialer
        conn = self._connections.get(node)
        if conn is not None:
            _RaftpayConnection.rp_adopt(conn)

    def _onNewIncomingConnection(self, conn):
        super()._onNewIncomingConnection(_RaftpayConnection.rp_adopt(conn))

    def send(self, node, message):
        so = self._syncObj
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "append_entries":
            message["rp_seq"] = so._rp_round
        elif kind == "next_node_idx":
            if so._rp_owner._fatal is not None:
                return False  # a replica that failed to load or apply acknowledges nothing
            so._rp_journal_sync()
            if so._rp_in_seq is not None:
                message["rp_seq"] = so._rp_in_seq
                message["rp_term"] = so._SyncObj__raftCurrentTerm
        ok = super().send(node, message)
        conn = self._connections.get(node)
        if ok and conn is not None and conn.getSendBufferSize():
            # The socket took only part of the message.  Upstream sends the rest only when it
            # next sends to this node (a heartbeat, up to a period later): a large entry then
            # reached followers in pieces, one heartbeat apart.  Ask the poller for writability,
            # which upstream's connection handles by sending the rest (and unsubscribing).
            so._poller.subscribe(conn.fileno(), conn._TcpConnection__processConnection,
                                 POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE
                                 | POLL_EVENT_TYPE.ERROR)
        return ok


class _LoopPoller:
    """Upstream's `Poller` interface over an asyncio event loop, so the Raft group runs on the
    same thread as the client server (`Node.start(loop=...)`).

    With a Raft thread of its own, every syscall that thread made released the GIL to the busy
    server thread and then waited for it back (CPython's switch interval): ~20 hand-overs per
    commit round, which made a round take ~12 ms under load with the CPU half idle.  Here the
    loop's selector watches upstream's sockets; `poll()` does nothing, and `on_event()` runs after
    each dispatched event so the node ticks (once per loop pass, however many events came).
    Error conditions reach upstream as READ (epoll reports them as readable); its read path
    notices the error and disconnects."""

    def __init__(self, loop, on_event: Callable[[], None]):
        self._loop = loop
        self._on_event = on_event
        self._subs: dict[int, list] = {}  # fd -> [callback, reading, writing]

    def subscribe(self, descr, callback, eventMask):
        reading = bool(eventMask & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR))
        writing = bool(eventMask & POLL_EVENT_TYPE.WRITE)
        sub = self._subs.get(descr)
        if sub is None:
            sub = self._subs[descr] = [callback, False, False]
        sub[0] = callback
        if reading != sub[1]:
            if reading:
                self._loop.add_reader(descr, self._dispatch, descr, POLL_EVENT_TYPE.READ)
            else:
                self._loop.remove_reader(descr)
            sub[1] = reading
        if writing != sub[2]:
            if writing:
                self._loop.add_writer(descr, self._dispatch, descr, POLL_EVENT_TYPE.WRITE)
            else:
                self._loop.remove_writer(descr)
            sub[2] = writing

    def unsubscribe(self, descr):
        # Upstream closes a socket before it unsubscribes it, so the selector may fail to modify
        # the fd (EBADF); it then forgets the fd altogether, which is what we want.  The kernel
        # dropped the closed fd from epoll itself.  Raising here would cut upstream's
        # disconnect() short and leave a dead connection that is never re-opened.
        sub = self._subs.pop(descr, None)
        if sub is not None:
            for watching, remove in ((sub[2], self._loop.remove_writer),
                                     (sub[1], self._loop.remove_reader)):
                if watching:
                    try:
                        remove(descr)
                    except (OSError, ValueError):
                        pass

    def poll(self, timeout):
        """The loop polls; a tick never waits here."""

    def _dispatch(self, descr, event):
        sub = self._subs.get(descr)
        if sub is None:
            return
        try:
            sub[0](descr, event)
        finally:
            self._on_event()


class _RaftpaySyncObj(SyncObj):
    """PySyncObj with the raftpay fixes.  Driven by exactly one thread through `rp_tick` (never
    autoTick).  `owner` supplies the state machine, `_apply_entry(index, entry) -> replies` (`entry`
    is the whole log command, our type byte included), and
    `_fatal` (not None once the replica must acknowledge nothing more).  All `rp_*` methods
    must be called on the thread that ticks, except the read-only ones `Node.status` uses."""

    def __init__(self, owner, self_addr: str, other_addrs: list[str], conf: SyncObjConf,
                 journal_path: str, fsync: bool, poller: _LoopPoller | None = None):
        assert not conf.autoTick, "the adapter must own the tick thread"
        self._rp_poller = poller  # None: upstream's own (a thread that ticks with a timeout)
        # Our connections seal frames with this, not with upstream's Fernet (see _Sealer).
        self._rp_sealer = _Sealer(conf.password) if conf.password else None
        self._rp_owner = owner
        self._rp_round = 0  # appendEntries rounds sent by this node (any term), for ReadIndex
        self._rp_commit_sent = 0  # commit index carried by the last round
        self._rp_acked: dict = {}  # node -> highest round it acknowledged in our term
        self._rp_in_seq = None  # round number of the appendEntries being handled now
        super().__init__(self_addr, other_addrs, conf=conf, transportClass=_RaftpayTransport)
        # Upstream opened a plain FileJournal in its __init__; nothing has ticked yet, so swap in
        # the durable subclass on the same file (it reads back what upstream just wrote).
        self._SyncObj__raftLog._destroy()
        self._SyncObj__raftLog = _RaftpayJournal(journal_path, fsync)

    # Upstream assigns `self._poller = createPoller(conf.pollerType)` in its __init__ and hands
    # it to the transport; a loop poller given to us takes its place before anything subscribes.
    @property
    def _poller(self):
        return self._rp_poller

    @_poller.setter
    def _poller(self, upstream_poller):
        if self._rp_poller is None:
            self._rp_poller = upstream_poller

    @property
    def encryptor(self):
        # What upstream's transport hands every connection as `conn.encryptor`.
        return self._rp_sealer

    # --- driving ----------------------------------------------------------------------------

    def rp_tick(self, wait_s: float) -> None:
        """One upstream tick (commit, apply, heartbeats, our `_on_tick`, then poll for up to
        `wait_s`).  Anything appended since the last sync is synced first, so the leader's own
        log is durable before the commit computation at the top of the tick counts it."""
        self._rp_journal_sync()
        self._onTick(wait_s)

    def rp_subscribe_fd(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._poller.subscribe(fd, lambda _fd, _ev: on_readable(), POLL_EVENT_TYPE.READ)

    def rp_unsubscribe_fd(self, fd: int) -> None:
        self._poller.unsubscribe(fd)

    def rp_destroy(self) -> None:
        """Close sockets and files (on the ticking thread, after its last tick)."""
        self._rp_journal_sync()
        # Upstream leaves a leader's snapshot transmission files open.
        for t in list(self._SyncObj__serializer._Serializer__transmissions.values()):
            f = t.get("file")
            if f is not None:
                f.close()
        self._doDestroy()

    def _rp_journal_sync(self) -> None:
        self._SyncObj__raftLog.rp_sync()

    # --- what the node reads ----------------------------------------------------------------

    def rp_role(self) -> str:
        return {_RAFT_STATE.LEADER: "leader", _RAFT_STATE.CANDIDATE: "candidate"}.get(
            self._SyncObj__raftState, "follower")

    def rp_is_leader(self) -> bool:
        return self._SyncObj__raftState == _RAFT_STATE.LEADER

    def rp_leader_addr(self) -> str | None:
        leader = self._SyncObj__raftLeader
        return None if leader is None else leader.id

    def rp_last_index(self) -> int:
        return self._SyncObj__raftLog[-1][1]

    def rp_log_entries(self) -> list:
        """A copy of the log as (command, index, term) tuples (tests and diagnostics)."""
        log_ = self._SyncObj__raftLog
        return [log_[i] for i in range(len(log_))]

    def rp_peers(self) -> dict:
        """addr -> {match_index, next_index, connected} (match/next are meaningful on a leader)."""
        match = dict(self._SyncObj__raftMatchIndex)
        nxt = dict(self._SyncObj__raftNextIndex)
        return {n.id: {"match_index": match.get(n), "next_index": nxt.get(n),
                       "connected": self.isNodeConnected(n)}
                for n in self._SyncObj__otherNodes}

    def rp_journal_syncs(self) -> int:
        return self._SyncObj__raftLog.rp_syncs

    def rp_committed_in_term(self) -> bool:
        """True once the leader committed an entry of its own term (its no-op), which is when its
        commit index is known to cover everything committed before it (Raft §8)."""
        entries = self._SyncObj__getEntries(self._SyncObj__raftCommitIndex, 1)
        return bool(entries) and entries[0][2] == self._SyncObj__raftCurrentTerm

    # --- what the node does -----------------------------------------------------------------

    def rp_append(self, command: bytes, on_result: Callable[[Any, int], None]) -> int:
        """Leader only: append one entry and subscribe `on_result(replies, fail_reason)` to its
        apply (upstream calls it with SUCCESS when index+term apply, DISCARDED when another entry
        applies at that index).  Returns the log index.  Does not send: see `rp_send_round`."""
        log_ = self._SyncObj__raftLog
        idx, term = log_[-1][1] + 1, self._SyncObj__raftCurrentTerm
        log_.add(command, idx, term)
        self._SyncObj__commandsWaitingCommit[idx].append((term, on_result))
        return idx

    def rp_send_round(self) -> int:
        """Leader only: send appendEntries to every connected follower now (new entries from each
        follower's nextIndex, plus the commit index).  Returns the round number."""
        self._SyncObj__sendAppendEntries()
        return self._rp_round

    def rp_commit_unsent(self) -> bool:
        """The commit index moved since the last round: followers should hear it promptly so
        their reads (wait_applied) do not wait for the next heartbeat."""
        return self._SyncObj__raftCommitIndex != self._rp_commit_sent

    def rp_quorum_round(self) -> int:
        """The highest round number acknowledged by a majority (counting this leader)."""
        acked = sorted((self._rp_acked.get(n, 0) for n in self._SyncObj__otherNodes),
                       reverse=True)
        need = (len(acked) + 1) // 2  # followers needed besides ourselves
        return self._rp_round if need == 0 else acked[need - 1]

    def rp_ping_peers(self) -> None:
        """Send a keepalive to every connected peer that is not the leader (a leader's own
        appendEntries keep its links busy).  Upstream checks a connection's read timeout only
        when it sends on it, so an idle follower<->follower link is declared dead at the first
        vote request after a quiet period and that vote is lost, costing a whole extra election
        timeout on failover."""
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        leader = self._SyncObj__raftLeader
        transport = self._SyncObj__transport
        for n in self._SyncObj__otherNodes:
            if n != leader and self.isNodeConnected(n):
                transport.send(n, {"type": _MSG_PING})

    # --- replaced / wrapped upstream internals ----------------------------------------------

    def _SyncObj__onMessageReceived(self, node, message):
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "append_entries":
            self._rp_in_seq = message.get("rp_seq")
            try:
                self._rp_on_append_entries(node, message)
            finally:
                self._rp_in_seq = None
        elif kind == "next_node_idx":
            self._rp_on_next_node_idx(node, message)
        elif kind in ("request_vote", "response_vote", "timeout_now"):
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        elif kind == _MSG_PING:
            pass
        else:
            # apply_command / apply_command_response are upstream's forwarding, which pickles
            # arbitrary calls into the log; raftpay never forwards, so it never accepts them.
            log.warning("dropping %r message from %s", kind, node)

    def _rp_on_append_entries(self, node, message):
        """Follower side of appendEntries, Raft §5.3 (upstream truncates whenever an append
        carries entries it already holds)."""
        term = message["term"]
        if term < self._SyncObj__raftCurrentTerm:
            return  # a stale leader; upstream also ignores it without an answer
        if "prevLogIdx" not in message or message.get("transmission") in ("start", "process"):
            # Snapshot install (replaces the log wholesale) and the first chunks of a large
            # entry (buffered, answered without success) are correct upstream.
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            return
        # Let upstream do its own term / leader / role / election-timer bookkeeping by handing it
        # the message without its log part and with a commit index that changes nothing.
        SyncObj._SyncObj__onMessageReceived(self, node, {
            "type": "append_entries", "term": term,
            "commit_index": self._SyncObj__raftCommitIndex})
        leader_commit = message["commit_index"]
        self._SyncObj__leaderCommitIndex = leader_commit

        if message.get("transmission") == "finish":
            head = self._SyncObj__recvTransmission
            if not isinstance(head, bytes):
                return  # a finish without its start: the leader resends from nextIndex
            data = head + message["data"]
            try:
                entries = [_pso_pickle.loads(data)]
            except Exception:
                # Upstream picks the "finish" chunk by the command's length, not the pickled
                # entry's, so when a chunk boundary falls between the two, "finish" comes early
                # and one more chunk follows (upstream's follower raises here and replication of
                # that entry never completes).  Keep collecting, answered like "process".
                self._SyncObj__recvTransmission = data
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)
                return
            self._SyncObj__recvTransmission = ""
        else:
            entries = message.get("entries", [])

        prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
        prev = self._SyncObj__getEntries(prev_idx, 1)
        if not prev:
            self._SyncObj__sendNextNodeIdx(node, success=False, reset=True)
            return
        if prev[0][2] != prev_term:
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=prev_idx, success=False, reset=True)
            return
        if entries and entries[0][1] != prev_idx + 1:
            log.warning("ignoring appendEntries with a gap from %s", node)
            return

        log_ = self._SyncObj__raftLog
        last_new = prev_idx
        for pos, entry in enumerate(entries):
            held = self._SyncObj__getEntries(entry[1], 1)
            if held and held[0][2] == entry[2]:
                last_new = entry[1]  # already ours: keep it, and everything after it
                continue
            if held:
                if entry[1] <= self._SyncObj__raftCommitIndex:
                    raise FatalNodeError(
                        f"leader {node} conflicts with committed entry {entry[1]} "
                        f"(term {held[0][2]} here, {entry[2]} there)")
                self._SyncObj__deleteEntriesFrom(entry[1])  # the conflicting suffix only
            for e in entries[pos:]:
                log_.add(*e)
            last_new = entries[-1][1]
            break

        # The transport syncs the log before this acknowledgement leaves.
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=last_new + 1, success=True)
        # Commit only what this message verified: entries past `last_new` may be stale ones
        # from an old term that the leader has not overwritten yet.
        if leader_commit > self._SyncObj__raftCommitIndex:
            new_commit = min(leader_commit, last_new)
            if new_commit > self._SyncObj__raftCommitIndex:
                self._SyncObj__raftCommitIndex = new_commit
                log_.setRaftCommitIndex(new_commit)

    def _rp_on_next_node_idx(self, node, message):
        """Leader side of an acknowledgement.  Upstream sets nextIndex to whatever a (possibly
        stale) reply says, which resends entries the follower holds; we only move it forward on
        success and never below matchIndex + 1 on failure."""
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        match, nxt = self._SyncObj__raftMatchIndex, self._SyncObj__raftNextIndex
        if node not in match:
            return
        next_idx = message["next_node_idx"]
        if message["success"]:
            if next_idx - 1 > match[node]:
                match[node] = next_idx - 1
            if next_idx > nxt[node]:
                nxt[node] = next_idx
        elif message["reset"]:
            nxt[node] = min(max(next_idx, match[node] + 1), self.rp_last_index() + 1)
        self._SyncObj__lastResponseTime[node] = _pso_monotonic()  # upstream's clock, not ours
        if message.get("rp_term") == self._SyncObj__raftCurrentTerm:
            seq = message.get("rp_seq") or 0
            if seq > self._rp_acked.get(node, 0):
                self._rp_acked[node] = seq

    def _SyncObj__sendAppendEntries(self):
        self._rp_round += 1
        self._rp_commit_sent = self._SyncObj__raftCommitIndex
        SyncObj._SyncObj__sendAppendEntries(self)

    def _SyncObj__onBecomeLeader(self):
        self._rp_acked = {}
        SyncObj._SyncObj__onBecomeLeader(self)
        # Upstream appended its no-op; a single-node group counts itself in this same tick.
        self._rp_journal_sync()

    def _SyncObj__doApplyCommand(self, command):
        if command[:1] == ENTRY_LEDGER:
            # Upstream increments lastApplied after this returns, so this is the entry's index.
            return self._rp_owner._apply_entry(self._SyncObj__raftLastApplied + 1, command)
        return SyncObj._SyncObj__doApplyCommand(self, command)


def _make_conf(*, raft_addr: str, data_dir: str, secret: str | None, election_timeout_s: float,
               heartbeat_s: float | None = None, batch_bytes: int = 2 ** 21,
               log_compaction_min_entries: int, serializer, deserializer) -> SyncObjConf:
    if heartbeat_s is None:
        heartbeat_s = election_timeout_s / 10
    return SyncObjConf(
        autoTick=False,  # `Node` owns the one thread that ticks
        appendEntriesUseBatch=True,  # we send right after appending, batching what accumulated
        appendEntriesPeriod=heartbeat_s,  # heartbeats; upstream wants < raftMinTimeout / 3
        # Entries up to this size travel whole; a larger one goes in chunks (see "finish").
        appendEntriesBatchSizeBytes=batch_bytes,
        raftMinTimeout=election_timeout_s,
        raftMaxTimeout=2 * election_timeout_s,
        # A leader that heard from no majority for an election timeout steps down (the upstream
        # default of 30 s leaves a partitioned leader believing it leads).
        leaderFallbackTimeout=election_timeout_s,
        connectionTimeout=max(2 * election_timeout_s, 3.5),
        connectionRetryTime=max(election_timeout_s / 2, 0.05),
        journalFile=os.path.join(data_dir, JOURNAL_FILE),
        fullDumpFile=os.path.join(data_dir, SNAPSHOT_FILE),  # both, or a restart loses state
        serializer=serializer,  # msgpack snapshots, not a pickle of our internals
        deserializer=deserializer,
        useFork=False,
        logCompactionMinEntries=log_compaction_min_entries,
        dynamicMembershipChange=False,
        commandsWaitLeader=False,
        password=secret,  # Fernet on every connection; without it anyone reaching the port
        # could send pickles
        bindAddress=raft_addr,  # only the given interface, not 0.0.0.0
        bindRetryTime=0.1,
        maxBindRetries=3,
    )

# ==============================================================================================
# END OF ADAPTER
# ==============================================================================================


class _Proposal:
    """One proposal's callback, called exactly once (on the Raft thread)."""

    __slots__ = ("callback", "index", "done")

    def __init__(self, callback):
        self.callback = callback
        self.index = None
        self.done = False

    def finish(self, code: Code, replies, index) -> None:
        if self.done:
            return
        self.done = True
        _call(self.callback, code, replies, index)

    def on_result(self, replies, fail_reason) -> None:  # upstream's apply-time callback
        code = _FAIL_TO_CODE.get(fail_reason, Code.OUTCOME_UNKNOWN)
        self.finish(code, replies if code == Code.OK else None, self.index)


class _Waiter:
    """A read_index or wait_applied request, answered exactly once (on the Raft thread)."""

    __slots__ = ("callback", "deadline", "index", "round", "done")

    def __init__(self, callback, deadline: float, index: int = 0):
        self.callback = callback
        self.deadline = deadline
        self.index = index
        self.round = 0
        self.done = False

    def finish(self, code: Code, index) -> None:
        if self.done:
            return
        self.done = True
        _call(self.callback, code, index)


class _Heap:
    """A min-heap of ``(key, seq, item)`` whose items may be answered (`item.done`) while deep
    inside it; those are dropped in bulk whenever the heap doubles, amortised O(1) per item."""

    __slots__ = ("items", "_limit")

    def __init__(self):
        self.items: list = []
        self._limit = 4096

    def push(self, key, seq: int, item) -> None:
        heapq.heappush(self.items, (key, seq, item))
        if len(self.items) > self._limit:
            self.items = [e for e in self.items if not e[2].done]
            heapq.heapify(self.items)
            self._limit = max(4096, 2 * len(self.items))

    def pop_while(self, pred) -> list:
        """Pop and return the items at the top while `pred(key, item)` holds."""
        out = []
        while self.items and pred(self.items[0][0], self.items[0][2]):
            out.append(heapq.heappop(self.items)[2])
        return out

    def drain(self) -> list:
        out, self.items = [e[2] for e in self.items], []
        return out


def _call(callback, *args) -> None:
    # A callback that raises must not break the Raft thread mid-apply (upstream would apply the
    # entry again on the next tick).
    try:
        callback(*args)
    except Exception:
        log.exception("node callback %r raised", callback)


class Node:
    """One Raft replica of the ledger.

    `peers` maps the *other* nodes' ids to their Raft addresses ("host:port").  `fsync` is
    "always" (an entry is on disk before it counts towards commit) or "never" (page cache only:
    survives a process kill, not a power loss of a majority).  `election_timeout_ms` sets the
    election timeout (randomised in [t, 2t]); heartbeats go every `heartbeat_ms` (default t/10)
    and a leader without a majority steps down after t.  An entry larger than
    `append_entries_batch_bytes` is sent in chunks.  `on_apply(index, ts, replies)` runs on the
    Raft thread after each ledger entry is applied on this replica (any role).  `ledger_cls`
    defaults to `raftpay.ledger.Ledger` (`ledger_cls(session_ttl_ms=...)`, `.restore(bytes)`).
    """

    def __init__(self, node_id: str, raft_addr: str, peers: dict[str, str], data_dir: str, *,
                 secret: str | None = None, fsync: str = "always",
                 election_timeout_ms: int = 1000, heartbeat_ms: int | None = None,
                 append_entries_batch_bytes: int = 2 * 1024 * 1024,
                 session_ttl_ms: int = 600_000,
                 on_apply: Callable[[int, int, list], None] | None = None,
                 propose_timeout_s: float = 30.0, read_timeout_s: float | None = None,
                 log_compaction_min_entries: int = 5000, max_pending_proposals: int = 100_000,
                 ledger_cls=None):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, not {fsync!r}")
        if heartbeat_ms is None:
            heartbeat_ms = election_timeout_ms / 10
        if not 0 < 3 * heartbeat_ms < election_timeout_ms:
            # PySyncObj asserts it; a follower must hear several heartbeats per election timeout.
            raise ValueError(f"election_timeout_ms ({election_timeout_ms}) must be more than "
                             f"three times heartbeat_ms ({heartbeat_ms})")
        if append_entries_batch_bytes <= 0:
            raise ValueError("append_entries_batch_bytes must be positive")
        if node_id in peers:
            raise ValueError(f"peers must list the other nodes only, not {node_id!r} itself")
        addrs = [raft_addr, *peers.values()]
        if len(set(addrs)) != len(addrs):
            raise ValueError(f"raft addresses must be distinct: {addrs}")
        self.node_id = node_id
        self.raft_addr = raft_addr
        self.peers = dict(peers)
        self.data_dir = data_dir
        self.fsync = fsync
        self._secret = secret
        self._election_timeout_s = election_timeout_ms / 1000
        self._heartbeat_s = heartbeat_ms / 1000
        self._batch_bytes = append_entries_batch_bytes
        self._session_ttl_ms = session_ttl_ms
        self._on_apply = on_apply
        self._propose_timeout_s = propose_timeout_s
        # A leader without a majority steps down after one election timeout, which answers its
        # pending reads NOT_LEADER/NO_LEADER; this deadline is only the backstop.
        self._read_timeout_s = read_timeout_s or 4 * self._election_timeout_s
        self._compaction_entries = log_compaction_min_entries
        self._max_pending = max_pending_proposals
        if ledger_cls is None:
            from .ledger import Ledger as ledger_cls
        self._ledger_cls = ledger_cls
        self._addr_to_id = {addr: nid for nid, addr in peers.items()}
        self._addr_to_id[raft_addr] = node_id

        self._lock = threading.Lock()  # guards the ledger
        self._ledger = None
        self._so: _RaftpaySyncObj | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._fatal: BaseException | None = None
        self._tick_wait_s = min(0.05, self._election_timeout_s / 20)
        # Loop mode (`start(loop=...)`): the Raft group ticks on that asyncio loop's thread.
        self._loop = None
        self._loop_thread_id: int | None = None
        self._tick_scheduled = False
        self._timer = None
        self._commit_notify_at = 0.0  # leader: when a commit-only round is due (0: none)

        # Handed from any thread to the Raft thread.
        self._inbox_proposals: collections.deque = collections.deque()
        self._inbox_reads: collections.deque = collections.deque()
        self._inbox_waits: collections.deque = collections.deque()
        self._wake_r = self._wake_w = -1
        self._wake_pending = False
        self._wake_lock = threading.Lock()  # no write to the pipe once it is closed

        # Owned by the Raft thread.
        #: log index -> (entry bytes, (ts, commands)) for this leader's own proposals that
        #: came with their decoded form (`propose(decoded=...)`), until applied.
        self._decoded: dict[int, tuple] = {}
        self._proposal_deadlines = _Heap()  # (deadline, seq, _Proposal)
        self._reads_unassigned: list[_Waiter] = []  # waiting for the leader's first commit
        self._reads_quorum: list[_Waiter] = []  # waiting for a majority round
        self._reads_apply: list[_Waiter] = []  # confirmed, waiting to apply up to their index
        self._applied_waiters = _Heap()  # (index, seq, _Waiter)
        self._wait_deadlines = _Heap()  # (deadline, seq, _Waiter)
        self._seq = itertools.count()
        self._next_ping = 0.0
        # Until this monotonic time, a leader keeps trying to hand leadership over (step_down).
        self._step_down_until = 0.0
        self._next_step_down_try = 0.0
        self._step_down_avoid: frozenset = frozenset()
        # (last log index, log size) as of the last tick: the journal itself is rewritten in
        # place during compaction, so other threads must not read it directly.
        self._published_log = (0, 0)
        # (role, term, leader raft addr), written together by the Raft thread once per tick.
        # Reading upstream's fields one by one from another thread could pair a new term with
        # the old role (upstream sets the term, fsyncs the meta file, then changes role), and a
        # status then showed two leaders in one term (found by the fault suite).
        self._published_role: tuple = ("follower", 0, None)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, loop=None) -> None:
        """Open the files, bind the Raft port, restore the snapshot and the committed part of the
        journal, and start ticking.  Blocks briefly (caller's thread).  Raises `FatalNodeError` if
        the stored state cannot be loaded, `OSError` if the port is taken.  Not restartable: make
        a new `Node` to start again.

        Without `loop` the node runs its own Raft thread.  With an asyncio `loop` (call this on
        that loop's thread) the Raft group's sockets join the loop's selector and every tick runs
        on the loop's thread, as do all callbacks: no GIL hand-over on the commit path."""
        if self._so is not None:
            raise RuntimeError("a Node starts once; create a new one to restart")
        os.makedirs(self.data_dir, exist_ok=True)
        self._ledger = self._ledger_cls(session_ttl_ms=self._session_ttl_ms)
        conf = _make_conf(raft_addr=self.raft_addr, data_dir=self.data_dir, secret=self._secret,
                          election_timeout_s=self._election_timeout_s,
                          heartbeat_s=self._heartbeat_s, batch_bytes=self._batch_bytes,
                          log_compaction_min_entries=self._compaction_entries,
                          serializer=self._write_snapshot, deserializer=self._read_snapshot)
        if loop is not None:
            self._loop = loop
            self._loop_thread_id = threading.get_ident()
        try:
            so = _RaftpaySyncObj(self, self.raft_addr, list(self.peers.values()), conf,
                                 os.path.join(self.data_dir, JOURNAL_FILE),
                                 fsync=self.fsync == "always",
                                 poller=_LoopPoller(loop, self._schedule_tick) if loop else None)
        except pysyncobj.SyncObjException as e:
            raise OSError(f"cannot bind Raft address {self.raft_addr}: {e}") from None
        self._so = so
        so.addOnTickCallback(self._on_tick)
        if loop is None:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            so.rp_subscribe_fd(self._wake_r, self._drain_wake)
        # The first tick loads the snapshot and applies the journal up to the stored commit
        # index, here on the caller's thread so a broken data dir fails `start()` itself.
        try:
            so.rp_tick(0)
        except Exception as e:
            self._fatal = e
        if self._fatal is not None:
            self._shutdown_raft()
            raise FatalNodeError(f"{self.node_id}: cannot load state from {self.data_dir}: "
                                 f"{self._fatal}") from self._fatal
        if loop is not None:
            self._timer = loop.call_later(self._tick_wait_s, self._on_timer)
            return
        self._thread = threading.Thread(target=self._run, name=f"raft-{self.node_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the Raft thread, answer everything pending (proposals OUTCOME_UNKNOWN, reads
        NOT_LEADER/NO_LEADER, waits READ_NOT_READY), sync and close the log, release the port.
        Blocks up to `timeout_s`.  Idempotent.  From a callback (the Raft thread) it only asks."""
        if self._so is None or self._stopped.is_set():
            return
        self._stopping = True
        if self._loop is not None:
            if threading.get_ident() == self._loop_thread_id:
                self._shutdown_raft()
            else:
                self._wake()
                self._stopped.wait(timeout_s)
            return
        self._wake()
        if self._thread is None:
            return
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout_s)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until this node knows a leader and has applied what that leader had committed
        when it first heard from it (upstream's onReady).  True if ready, False on timeout."""
        return self._ready.wait(timeout_s)

    # --- writes and reads -------------------------------------------------------------------

    def propose(self, payload: bytes, callback: Callable[[Code, list | None, int | None], None],
                timeout_s: float | None = None, decoded: tuple | None = None) -> None:
        """Replicate `payload` (``msgpack.packb([ts, commands])``) and call
        ``callback(code, replies, log_index)`` exactly once:

        * OK with the ledger's replies, after this leader applied the entry;
        * NOT_LEADER / NO_LEADER when this node is not the leader (nothing was appended; it never
          forwards), or when another entry was committed at this one's index;
        * OVERLOADED if too many proposals wait (nothing was appended);
        * OUTCOME_UNKNOWN after `timeout_s` (default `propose_timeout_s`) or on stop with the
          entry appended but not yet applied here: it may still commit; retry with the same ids.

        Any thread; never blocks.  The callback runs on the Raft thread, or inline before this
        returns when the node refuses up front (stopped, overloaded).  Raises ValueError on a
        payload that is not ``[int, list]`` msgpack (misuse, not a business outcome).

        `decoded`, if given, is ``(ts, commands)`` exactly as packed into `payload` (msgpack
        types only: what unpacking `payload` gives back), and nothing else may hold or change
        them afterwards.  This replica then applies those objects instead of unpacking the entry
        again (a fifth of the leader's time with large batches).  Other replicas unpack.
        """
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError("payload must be msgpack bytes")
        # Check the shape from the headers only: decoding a whole 8k-event payload here, once
        # more than apply does, cost a tenth of the leader's time in batched runs.  The body
        # comes from the local server's own msgpack.packb, so its inside is well formed.
        try:
            head = msgpack.Unpacker(raw=False)
            head.feed(payload[:32])
            if head.read_array_header() != 2:
                raise ValueError
            ts = head.unpack()
            head.read_array_header()
        except Exception:
            raise ValueError("payload must be msgpack [ts: int, commands: list]") from None
        if type(ts) is not int:
            raise ValueError("payload must be msgpack [ts: int, commands: list]")
        p = _Proposal(callback)
        if self._stopping or self._so is None or self._stopped.is_set():
            p.finish(Code.NOT_LEADER if self._so is not None else Code.NO_LEADER, None, None)
            return
        if len(self._inbox_proposals) >= self._max_pending:
            p.finish(Code.OVERLOADED, None, None)
            return
        deadline = time.monotonic() + (self._propose_timeout_s if timeout_s is None
                                       else timeout_s)
        self._inbox_proposals.append((bytes(payload), p, deadline, decoded))
        self._wake()
        if self._stopped.is_set():
            self._answer_inboxes()  # the Raft thread may have drained before our append

    def read_index(self, callback: Callable[[Code, int | None], None],
                   timeout_s: float | None = None) -> None:
        """Linearizable read barrier: ``callback(OK, index)`` once this node, as leader, has had
        a majority acknowledge an appendEntries round that started after this call, and has
        applied up to the commit index it held when the round was started (Raft §8 ReadIndex).
        A query under `query()` then sees every write acknowledged before this call.
        ``callback(NOT_LEADER | NO_LEADER, None)`` if this node is not or stops being leader, or
        cannot confirm within `timeout_s` (default 4 election timeouts).  Any thread; never
        blocks; callback on the Raft thread.  Concurrent reads share one round."""
        w = _Waiter(callback, time.monotonic() + (timeout_s or self._read_timeout_s))
        if self._so is None or self._stopping or self._stopped.is_set():
            w.finish(Code.NO_LEADER, None)
            return
        self._inbox_reads.append(w)
        self._wake()
        if self._stopped.is_set():
            self._answer_inboxes()

    def wait_applied(self, index: int, timeout_s: float,
                     callback: Callable[[Code, int], None]) -> None:
        """``callback(OK, applied_index)`` once this replica applied `index` (any role: for
        follower reads with a version a write returned), or ``callback(READ_NOT_READY,
        applied_index)`` after `timeout_s`.  Any thread; never blocks.  The callback runs inline
        if `index` is already applied, else on the Raft thread."""
        so = self._so
        applied = so.raftLastApplied if so is not None else 0
        w = _Waiter(callback, time.monotonic() + timeout_s, index)
        if applied >= index:
            w.finish(Code.OK, applied)
            return
        if so is None or self._stopping or self._stopped.is_set():
            w.finish(Code.READ_NOT_READY, applied)
            return
        self._inbox_waits.append(w)
        self._wake()
        if self._stopped.is_set():
            self._answer_inboxes()

    def query(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(ledger)`` under the ledger lock and return its result.  Any thread; blocks
        while an entry is being applied.  `fn` must only read, and must not call back into the
        node.  Pair it with `read_index` or `wait_applied` for a consistent read."""
        with self._lock:
            return fn(self._ledger)

    def state_hash(self) -> str:
        """The ledger's state hash at this replica's applied index (see `status()`)."""
        with self._lock:
            return self._ledger.state_hash()

    # --- state ------------------------------------------------------------------------------

    @property
    def leader_id(self) -> str | None:
        """Node id of the leader this node last heard from (itself if leader), or None.  Can be
        stale by up to an election timeout; use it as a hint."""
        if self._so is None or self._stopped.is_set():
            return None
        addr = self._published_role[2]
        return None if addr is None else self._addr_to_id.get(addr)

    def step_down(self, avoid: Iterable[str] = ()) -> None:
        """Hand leadership to the most caught-up follower, for up to one election timeout.

        Any thread; returns at once; a no-op on a follower.  The server calls it when this
        node's clock is too far from the cluster's to stamp entries (clock.ClockGuard): a leader
        that must not stamp must not lead.  Uses upstream's public `transferLeadership`
        (Raft's TimeoutNow), retried each heartbeat until a follower is caught up and takes over.
        `avoid` names peers that must not get it (e.g. the clock guard's suspects: handing
        leadership to another off clock would only bounce it back).
        """
        self._step_down_avoid = frozenset(avoid)
        self._step_down_until = time.monotonic() + self._election_timeout_s
        self._wake()

    def _step_down_target(self, so) -> str | None:
        """Raft address of a connected, fully caught-up peer not in `avoid` (upstream's
        transferLeadership denies any other), or None to try again next heartbeat."""
        last = so.rp_last_index()
        for addr, p in so.rp_peers().items():
            if (p["connected"] and p["match_index"] == last
                    and self._addr_to_id.get(addr) not in self._step_down_avoid):
                return addr
        return None

    def runs_on(self, loop) -> bool:
        """True if this node ticks on `loop` (`start(loop=...)`): its callbacks then run on that
        loop's thread and need no `call_soon_threadsafe`."""
        return loop is not None and self._loop is loop

    def is_leader(self) -> bool:
        """True if this node believes it leads.  A hint (a deposed leader may not know yet);
        `propose` and `read_index` decide on the Raft thread."""
        return (self._so is not None and not self._stopped.is_set()
                and self._published_role[0] == "leader")

    def status(self) -> dict:
        """A point-in-time view for operators and the server's status call.  Any thread; never
        blocks.  Fields are read without stopping the Raft thread, so they may come from
        adjacent ticks (e.g. applied_index one entry ahead of commit_index)."""
        so = self._so
        st = {"id": self.node_id, "raft_addr": self.raft_addr, "fsync": self.fsync,
              "running": so is not None and not self._stopped.is_set(),
              "fatal": None if self._fatal is None else repr(self._fatal)}
        if so is None:
            return st
        role, term, _ = self._published_role
        last, size = self._published_log
        st.update(role=role, term=term, commit_index=so.raftCommitIndex,
                  applied_index=so.raftLastApplied, last_log_index=last,
                  leader_id=self.leader_id, log_size=size,
                  journal_syncs=so.rp_journal_syncs(), ready=self._ready.is_set())
        peers = {}
        for addr, p in so.rp_peers().items():
            entry = {"id": self._addr_to_id.get(addr, addr), "connected": p["connected"]}
            if role == "leader" and p["match_index"] is not None:
                entry.update(match_index=p["match_index"], next_index=p["next_index"],
                             lag=max(0, last - p["match_index"]))
            peers[entry["id"]] = entry
        st["peers"] = peers
        return st

    # --- the Raft thread --------------------------------------------------------------------

    def _run(self) -> None:
        so = self._so
        while not self._stopping:
            try:
                due = self._commit_notify_at
                so.rp_tick(self._tick_wait_s if not due else
                           min(self._tick_wait_s, max(0.0, due - time.monotonic())))
            except FatalNodeError as e:
                self._fatal = e
                log.critical("%s: stopping: %s", self.node_id, e)
                break
            except Exception:
                # Upstream's own autoTick does the same: log, pause a little, go on.
                log.exception("%s: Raft tick failed", self.node_id)
                time.sleep(self._tick_wait_s)
            if self._fatal is not None:
                log.critical("%s: stopping: %r", self.node_id, self._fatal)
                break
        self._shutdown_raft()

    def _tick_once(self) -> bool:
        """One tick without waiting (loop mode); False once the node must stop."""
        try:
            self._so.rp_tick(0)
        except FatalNodeError as e:
            self._fatal = e
        except Exception:
            log.exception("%s: Raft tick failed", self.node_id)  # as upstream's autoTick does
        if self._fatal is not None:
            log.critical("%s: stopping: %r", self.node_id, self._fatal)
            return False
        return True

    def _schedule_tick(self) -> None:
        """Loop mode: tick once more soon, after the events already due in this loop pass (so a
        burst of messages and proposals is handled by one tick).  Loop thread."""
        if not self._tick_scheduled and not self._stopped.is_set():
            self._tick_scheduled = True
            self._loop.call_soon(self._loop_tick)

    def _loop_tick(self) -> None:
        self._tick_scheduled = False
        if self._stopped.is_set():
            return
        if self._stopping or not self._tick_once():
            self._shutdown_raft()

    def _on_timer(self) -> None:
        # Heartbeats, election deadlines, connection retries and request deadlines advance
        # with time, not with events.
        if self._stopped.is_set():
            return
        self._timer = self._loop.call_later(self._tick_wait_s, self._on_timer)
        self._schedule_tick()

    def _shutdown_raft(self) -> None:
        """Answer everything pending, then close the Raft group's sockets and files."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stopping = True
        self._stopped.set()  # from here on, callers answer their own late requests
        so = self._so
        self._answer_inboxes()
        for p in self._proposal_deadlines.drain():
            p.finish(Code.OUTCOME_UNKNOWN, None, p.index)  # appended; may still commit
        for w in self._reads_unassigned + self._reads_quorum + self._reads_apply:
            w.finish(Code.NO_LEADER, None)
        self._reads_unassigned, self._reads_quorum, self._reads_apply = [], [], []
        for w in self._wait_deadlines.drain():
            w.finish(Code.READ_NOT_READY, so.raftLastApplied)
        self._applied_waiters.drain()
        with self._wake_lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        try:
            if fds[0] >= 0:
                so.rp_unsubscribe_fd(fds[0])
            so.rp_destroy()
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _answer_inboxes(self) -> None:
        """Answer requests that never reached the Raft thread (any thread; popleft is atomic,
        so each request is answered by whoever pops it)."""
        for _, p, _, _ in self._drain(self._inbox_proposals):
            p.finish(Code.NOT_LEADER, None, None)  # never appended
        for w in self._drain(self._inbox_reads):
            w.finish(Code.NO_LEADER, None)
        applied = self._so.raftLastApplied if self._so is not None else 0
        for w in self._drain(self._inbox_waits):
            w.finish(Code.READ_NOT_READY, applied)

    @staticmethod
    def _drain(dq: collections.deque) -> list:
        out = []
        while True:
            try:
                out.append(dq.popleft())
            except IndexError:
                return out

    def _wake(self) -> None:
        if self._loop is not None:
            if threading.get_ident() == self._loop_thread_id:
                self._schedule_tick()
            else:
                try:
                    self._loop.call_soon_threadsafe(self._schedule_tick)
                except RuntimeError:  # the loop is closed: the node stopped with it
                    pass
            return
        # One byte per sleep is enough: the Raft thread drains every inbox after each poll.
        if self._wake_pending:
            return
        with self._wake_lock:  # the fd number could be reused once closed
            if self._wake_pending or self._wake_w < 0:
                return
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _drain_wake(self) -> None:
        self._wake_pending = False  # clear before draining: a later _wake writes again
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _on_tick(self) -> None:
        """Runs inside every upstream tick, after commit and apply, before the poll."""
        so = self._so
        now = time.monotonic()
        is_leader = so.rp_is_leader()
        appended = self._take_proposals(so, is_leader)
        need_round = self._take_reads(so, is_leader)
        if is_leader and (appended or need_round):
            so.rp_send_round()
            self._commit_notify_at = 0.0
        elif is_leader and so.rp_commit_unsent():
            # Followers learn a new commit index with the next round.  Under load that is the
            # next entry's, a moment away; a round of its own right after every commit cost two
            # messages and two acknowledgements per entry and delayed the replies of the tick.
            # If nothing else goes out within COMMIT_NOTIFY_S, a round goes for it alone (so a
            # follower read waiting for a version is not kept waiting for a heartbeat).
            if not self._commit_notify_at:
                self._commit_notify_at = now + COMMIT_NOTIFY_S
                if self._loop is not None:
                    self._loop.call_later(COMMIT_NOTIFY_S, self._schedule_tick)
            elif now >= self._commit_notify_at:
                so.rp_send_round()
                self._commit_notify_at = 0.0
        # The leader's own write overlaps the followers' (Raft §10.2.1); it is done before the
        # next tick's commit computation counts this leader.
        so._rp_journal_sync()
        self._finish_reads(so, now)
        self._finish_waits(so, now)
        for p in self._proposal_deadlines.pop_while(lambda deadline, p: p.done or deadline <= now):
            p.finish(Code.OUTCOME_UNKNOWN, None, p.index)  # appended; may still commit
        if now >= self._next_ping:
            self._next_ping = now + self._heartbeat_s
            so.rp_ping_peers()
        if is_leader and now < self._step_down_until and now >= self._next_step_down_try:
            self._next_step_down_try = now + self._heartbeat_s
            target = self._step_down_target(so)
            if target is not None:
                so.transferLeadership(target)
        if not self._ready.is_set() and so.isReady() and so.rp_leader_addr() is not None:
            self._ready.set()
        self._published_log = (so.rp_last_index(), so._getRaftLogSize())
        self._published_role = (so.rp_role(), so.raftCurrentTerm, so.rp_leader_addr())

    def _take_proposals(self, so: _RaftpaySyncObj, is_leader: bool) -> bool:
        """Append every queued proposal (leader) or refuse it; True if anything was appended.
        Deciding here, on the Raft thread, makes NOT_LEADER certain: nothing was appended."""
        appended = False
        if not is_leader and self._decoded:
            self._decoded.clear()  # entries of a lost term: applied, if at all, by unpacking
        for payload, p, deadline, decoded in self._drain(self._inbox_proposals):
            if not is_leader:
                p.finish(Code.NOT_LEADER if so.rp_leader_addr() else Code.NO_LEADER, None, None)
                continue
            entry = ENTRY_LEDGER + payload
            p.index = so.rp_append(entry, p.on_result)
            if decoded is not None:
                self._decoded[p.index] = (entry, decoded)
            # A proposal normally ends at its apply, long before its deadline; `_Heap` drops it.
            self._proposal_deadlines.push(deadline, next(self._seq), p)
            appended = True
        if appended and not self.peers:
            # A one-node cluster commits on its own: no acknowledgement will wake the next
            # tick, whose commit computation would otherwise wait for the poll timeout.
            self._wake()
        return appended

    def _take_reads(self, so: _RaftpaySyncObj, is_leader: bool) -> bool:
        """Admit new read_index requests; True if a round must start now to confirm them."""
        new_reads = self._drain(self._inbox_reads)
        if not is_leader:
            code = Code.NOT_LEADER if so.rp_leader_addr() else Code.NO_LEADER
            for w in new_reads + self._reads_unassigned + self._reads_quorum + self._reads_apply:
                w.finish(code, None)
            self._reads_unassigned, self._reads_quorum, self._reads_apply = [], [], []
            return False
        self._reads_unassigned.extend(new_reads)
        if not self._reads_unassigned or not so.rp_committed_in_term():
            return False  # a new leader's commit index is not yet known to be current
        # Each read takes the commit index as of now and waits for a majority to acknowledge a
        # round that starts after now: the one the caller sends right after this.
        commit, rnd = so.raftCommitIndex, so._rp_round + 1
        for w in self._reads_unassigned:
            w.index, w.round = commit, rnd
        self._reads_quorum.extend(self._reads_unassigned)
        self._reads_unassigned = []
        return True

    def _finish_reads(self, so: _RaftpaySyncObj, now: float) -> None:
        if self._reads_quorum:
            confirmed = so.rp_quorum_round()
            self._reads_apply.extend(w for w in self._reads_quorum if w.round <= confirmed)
            self._reads_quorum = [w for w in self._reads_quorum if w.round > confirmed]
        applied = so.raftLastApplied
        for w in self._reads_apply:
            if applied >= w.index:
                w.finish(Code.OK, w.index)
        for w in self._reads_unassigned + self._reads_quorum + self._reads_apply:
            if now >= w.deadline:
                w.finish(Code.NO_LEADER, None)  # no majority confirmed this leader in time
        self._reads_unassigned = [w for w in self._reads_unassigned if not w.done]
        self._reads_quorum = [w for w in self._reads_quorum if not w.done]
        self._reads_apply = [w for w in self._reads_apply if not w.done]

    def _finish_waits(self, so: _RaftpaySyncObj, now: float) -> None:
        applied = so.raftLastApplied
        for w in self._drain(self._inbox_waits):
            self._applied_waiters.push(w.index, next(self._seq), w)
            self._wait_deadlines.push(w.deadline, next(self._seq), w)
        for w in self._applied_waiters.pop_while(lambda index, w: index <= applied or w.done):
            w.finish(Code.OK, applied)
        for w in self._wait_deadlines.pop_while(lambda deadline, w: w.done or deadline <= now):
            w.finish(Code.READ_NOT_READY, applied)

    # --- the state machine (called by the adapter on the Raft thread) ------------------------

    def _apply_entry(self, index: int, entry: bytes) -> list:
        """Apply one committed log entry (Raft thread, in log order, on every replica).  `entry`
        is the log command: ENTRY_LEDGER, then msgpack ``[ts, commands]``."""
        decoded = self._decoded.pop(index, None) if self._decoded else None
        with self._lock:
            try:
                if decoded is not None and decoded[0] is entry:
                    # The very bytes object this leader appended (a different entry committed
                    # at this index would be another object): the proposer's own decoded
                    # commands, equal to what unpacking gives, without unpacking them again.
                    ts, commands = decoded[1]
                else:
                    ts, commands = msgpack.unpackb(memoryview(entry)[1:], raw=False,
                                                   strict_map_key=False)
                replies = self._ledger.apply_entry(commands, ts)
            except Exception as e:
                # `propose` validated the payload and apply_entry is deterministic and must not
                # raise; if this happens every replica stops at the same entry, and skipping it
                # or retrying it forever would be worse than stopping for an operator.
                self._fatal = e
                raise FatalNodeError(f"cannot apply entry {index}: {e!r}") from e
        if self._on_apply is not None:
            _call(self._on_apply, index, ts, replies)
        return replies

    def _write_snapshot(self, path: str, raft_data) -> None:
        """Upstream's `serializer` hook (Raft thread, during log compaction): write the ledger and
        the two log entries upstream needs to resume, then fsync; upstream renames the file into
        place and our journal fsyncs the directory before dropping entries."""
        last, prev, _cluster = raft_data
        with self._lock:
            ledger_bytes = self._ledger.snapshot()
        doc = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
               "last": list(last), "prev": list(prev), "ledger": ledger_bytes}
        with open(path, "wb") as f:
            f.write(msgpack.packb(doc, use_bin_type=True))
            f.flush()
            if self.fsync == "always":
                os.fsync(f.fileno())

    def _read_snapshot(self, path: str):
        """Upstream's `deserializer` hook (at start, and when a leader installs a snapshot):
        make the file durable (an installed one was just renamed into place), restore the
        ledger from it, and return the entries upstream resumes from."""
        try:
            if self.fsync == "always":
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                _fsync_dir(os.path.dirname(path) or ".")
            with open(path, "rb") as f:
                doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
            if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"{path} is not a raftpay snapshot")
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"{path}: snapshot version {doc.get('version')!r} unsupported")
            ledger = self._ledger_cls.restore(doc["ledger"])
        except Exception as e:
            # Upstream would log and carry on with an empty state machine over a compacted log.
            self._fatal = e
            raise
        with self._lock:
            self._ledger = ledger
        return tuple(doc["last"]), tuple(doc["prev"]), None

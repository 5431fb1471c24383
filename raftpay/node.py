"""One replica: a `Ledger` hosted in a PySyncObj Raft group.

Design.  The node is a thin wrapper around the state machine (rqlite `store/` is the model):
a proposal is a msgpack payload ``[ts, commands]`` that the leader appends to the Raft log; every
replica applies committed entries in log order as ``ledger.apply_entry(commands, ts)`` under one
ledger lock, and the proposing leader's callback fires after that apply, never before.  This is
the only module that imports PySyncObj, and every reach into its internals lives in the fenced
section "ADAPTER OVER PYSYNCOBJ 0.3.17 INTERNALS" below, pinned name by name by
`tests/test_raft_adapter.py`.  The adapter exists for seven reasons, each a gap in PySyncObj
0.3.17 (see /work/shared/ENGINE_NOTES.md):

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
  round before a follower acknowledges it and before the leader counts itself (a follower that
  finds several rounds in one read handles them all, syncs once, then acknowledges each); term/vote
  and snapshots are written temp-fsync-rename-fsync(dir).  A failed sync, or a journal that
  cannot grow (its blocks are reserved first: upstream's holes made a full disk a SIGBUS),
  stops the replica.
* Availability: upstream raises its term at every election timeout, heard or not, so a node back
  from a partition deposes a healthy leader.  The adapter runs a pre-vote round first (Raft
  thesis §9.6): no new term without a majority that has no leader and no newer log.
* Reads: upstream has no ReadIndex.  The adapter numbers appendEntries rounds, followers echo the
  number, and a read completes once a majority acknowledged a round that started after the read.
* Safety of the log format: our entries are raw msgpack bytes behind a type byte of our own, so
  applying the log never unpickles; followers never forward proposals (upstream forwarding
  pickles), and a node answers `NOT_LEADER` instead.
* Log compaction: upstream calls a custom serializer synchronously on the ticking thread, which
  for a large ledger froze the serving loop for 1-2 s per compaction (no replies, no heartbeats).
  Here a forked child writes the snapshot (copy-on-write gives it the ledger exactly as of the
  applied index upstream recorded); the ticking thread only forks (tens of ms for a large heap)
  and, once the child is done, renames the file into place and lets upstream drop the journal
  entries it covers.  Upstream's own fork mode lost acknowledged entries: its child renamed the
  new snapshot into place on its own schedule (even after the node had stopped), and a restart
  that found a snapshot newer than the journal's head cleared the whole journal.  Here the
  rename happens only on the ticking thread, a restart drops only the entries the snapshot
  covers, and the journal is compacted by writing a new file and renaming it over the old one
  (upstream rewrote it in place, so a crash half way lost its tail).  Sending a snapshot to a
  lagging follower: upstream kept the leader's loop sending it for a whole heartbeat period per
  round, through 64 KB socket buffers; here a round adds a bounded amount, rounds keep coming
  while it lasts, the buffers are 4 MB, and the follower neither commits its own unverified
  entries on a snapshot message nor starts an election after a long install.  Replicas hold
  the same log, so they all compacted at the same index, every writer at once; the k-th of n
  now takes its first compaction at (1 + k/n) times the thresholds (`rp_stagger`), and starts a
  large one only in its own window of the wall clock (`rp_my_turn`), so they stay apart.

Threads.  Public methods are thread-safe and never block on Raft (except `start`, `stop`,
`wait_ready` and `query`, which say so).  Callbacks run on the thread that ticks (the Raft thread,
or the loop's thread in loop mode) unless a method says otherwise; they must be quick and must not
call `stop()` synchronously.  The asyncio server queues them into its loop, with `call_soon` when
the node ticks on that loop (`runs_on`) and `call_soon_threadsafe` otherwise.
"""

from __future__ import annotations

import collections
import errno
import gc
import hashlib
import heapq
import io
import itertools
import json
import logging
import os
import pickle
# Loaded now, not at the first snapshot: os.wait4 imports it for its result, which opens a
# file, and a node whose descriptors clients had all taken failed every tick with EMFILE.
import resource  # noqa: F401
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterable

import msgpack

from . import wire
from .codes import Code

log = logging.getLogger(__name__)

#: Where a node keeps its files inside `data_dir`.
JOURNAL_FILE = "raft.journal"  # PySyncObj FileJournal; its term/vote live in "raft.journal.meta"
SNAPSHOT_FILE = "raft.snapshot"  # msgpack, written by `Node._write_snapshot_file`
SNAPSHOT_FORMAT = "raftpay-raft-snapshot"
SNAPSHOT_VERSION = 1
#: A snapshot being written is `raft.snapshot.writing.<pid>.<n>` until the Raft thread renames it
#: to SNAPSHOT_FILE.  Nothing ever reads one; `Node.start` removes any left by a crash.
SNAPSHOT_WRITING_PREFIX = SNAPSHOT_FILE + ".writing."
#: A snapshot writer syncs after each of these: the node's own journal syncs then queue behind
#: at most this much of it on the disk, not the whole file at once.
SNAPSHOT_SYNC_BYTES = 4 * 1024 * 1024
#: How much a forked snapshot writer lowers its CPU priority (see `_SnapshotJob`).
SNAPSHOT_WRITER_NICE = 19
#: Bytes of log entries that start a compaction, unless the config says otherwise (the default
#: of `[raft] log_compaction_bytes`).
LOG_COMPACTION_BYTES = 64 * 1024 * 1024

FSYNC_POLICIES = ("always", "never")

#: A leader tells followers a new commit index with its next appendEntries round; when no round
#: goes out for this long after a commit, it sends one for the commit alone.
COMMIT_NOTIFY_S = 0.002
#: While a leader sends a snapshot to a lagging follower, a round goes out at least this often:
#: each round adds a bounded amount of it (the adapter's RP_TRANSMIT_BACKLOG_BYTES), so the
#: transmission keeps flowing between heartbeats without one round holding the loop.
TRANSMIT_ROUND_S = 0.01


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


#: Held locked (flock) by the node using a data dir, with its pid inside for the message.
LOCK_FILE = "LOCK"


def lock_data_dir(data_dir: str) -> int:
    """Take `data_dir` for this process: an exclusive, non-blocking flock on its LOCK file,
    held until the returned fd is closed (or the process dies, kill -9 included: the kernel
    drops it).  Two nodes on one data dir would append to one journal and each remove the
    other's snapshot files; the second is refused with `FatalNodeError` naming the holder.
    A forked snapshot writer shares the lock; it is the same node.  Blocks on nothing."""
    import fcntl
    path = os.path.join(data_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FatalNodeError(f"cannot lock data dir {data_dir}: {e!r}") from None
        raise FatalNodeError(f"data dir {data_dir} is in use by another node (pid {holder}); "
                             f"one data dir serves one node at a time") from None
    try:  # the pid only names the holder in a refusal: a full disk must not stop the node
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


#: Names the node a data dir belongs to: written by `init_data_dir` (or at the first start of
#: a node that may claim a new dir), checked at every start (`claim_data_dir`).
NODE_FILE = "NODE"


#: A node's state in its data dir (what it must not lose): the Raft journal, its term/vote
#: file and snapshots, or the zk-election mode's log (`raftpay.zk.baseline.LOG_FILE`).  Not
#: the lock, the NODE file or the event log, which a server writes before its node starts.
STATE_FILE_PREFIXES = ("raft.", "zk-baseline.")


def _node_files(data_dir: str) -> list[str]:
    """The files of a node's state (STATE_FILE_PREFIXES) in `data_dir`."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(STATE_FILE_PREFIXES))


def _replace_file(path: str, data: bytes, sync: bool = True) -> None:
    """Put `data` at `path` whole: written beside it, then renamed over it; with `sync` the
    file and the rename are on disk when this returns."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        _fsync_dir(os.path.dirname(path) or ".")


#: Salt of `cluster_id`'s derivation.
_CLUSTER_ID_SALT = b"raftpay/cluster-id/v1"


def cluster_id(name: str, members: Iterable[str]) -> str:
    """The id of the cluster a new data dir is made for (16 hex digits), the same on every
    node made from one cluster's configs: derived from the cluster's name and its members'
    ids, so clusters that differ in either differ.  Kept in the NODE file and stamped on every
    Raft frame (`_RaftpayConnection`); a node refuses the frames of another cluster's.  Not
    from the addresses: a node may know a peer by another address than the rest do (a proxy,
    NAT, a DNS name).  Not from the secret: a node made with a mistyped one must join once
    the typo is fixed (its frames say "another secret" until then)."""
    about = json.dumps([name, sorted(members)]).encode()
    return hashlib.sha256(_CLUSTER_ID_SALT + about).digest()[:8].hex()


def write_node_file(data_dir: str, node_id: str, sync: bool, rejoin: bool = False,
                    cluster: str | None = None) -> None:
    """Write the dir's NODE file (atomically; durably with `sync`): the node and the cluster
    (`cluster_id`) it belongs to.  `rejoin` marks a node that lost its data: it does not vote
    until it holds what the cluster committed (`_RaftpaySyncObj.rp_abstain`), and the node
    rewrites the file without it then; such a node may have no cluster yet, and takes its
    peers' (`_RaftpayConnection._rp_cluster_refusal`)."""
    body: dict = {"node": node_id}
    if cluster is not None:
        body["cluster"] = cluster
    if rejoin:
        body["rejoin"] = True
    _replace_file(os.path.join(data_dir, NODE_FILE), json.dumps(body).encode() + b"\n", sync)


def clear_rejoin_mark(data_dir: str, node_id: str, sync: bool, cluster: str | None) -> bool:
    """A rejoining node caught up: rewrite its NODE file without the mark (naming `cluster`),
    before it votes or stands again, so a restart does not rejoin again for nothing.  False,
    with a warning, if the file cannot be written: the node stays rejoining and tries again."""
    try:
        write_node_file(data_dir, node_id, sync, cluster=cluster)
    except OSError as e:
        log.warning("%s: caught up after rejoining, but cannot rewrite %s (%s); still "
                    "rejoining, will try again", node_id, NODE_FILE, e)
        return False
    return True


def read_node_file(data_dir: str) -> dict | None:
    """The dir's NODE file ({"node": id, "cluster"?: id, "rejoin"?: true}), None without one;
    FatalNodeError if it does not name a node."""
    path = os.path.join(data_dir, NODE_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
        owner = info["node"]
    except (ValueError, KeyError, TypeError):
        info, owner = None, None
    if not isinstance(owner, str) or not isinstance(info.get("rejoin", False), bool) or not (
            info.get("cluster") is None or _is_cluster_id(info["cluster"])):
        raise FatalNodeError(f"{path} does not name the node the data dir belongs to "
                             f"({raw[:60]!r}); restore it as {{\"node\": \"<id>\"}} or move "
                             f"the data dir aside")
    return info


def _is_cluster_id(value) -> bool:
    return (isinstance(value, str) and len(value) == 16
            and all(c in "0123456789abcdef" for c in value))


#: Why `node start` refuses a data dir nobody initialized (`claim_data_dir(create=False)`);
#: `{risk}` and `{then}` by mode (`_NOT_INITIALIZED_BY_MODE`).
NOT_INITIALIZED = (
    "data dir {data_dir} holds no node: a new node's dir is made once with `raftpay node init "
    "--config ...`. If this node had data and lost it (a new disk, a wiped dir), it must not "
    "come back as a new node: {risk}. Make its dir with `raftpay node init --rejoin --config "
    "...`: it then {then} until it holds what was committed. See README, 'A node that lost "
    "its data'")
_NOT_INITIALIZED_BY_MODE = {
    "raft": {"risk": "it would have forgotten its vote and the entries it acknowledged, and "
                     "could help elect a leader without them (acknowledged payments lost)",
             "then": "does not vote"},
    "zk-election": {"risk": "counted in a new primary's quorum, it could let one lead without "
                            "committed batches",
                    "then": "neither stands for primary nor counts"},
}


def claim_data_dir(data_dir: str, node_id: str, cluster: str, sync: bool = True,
                   create: bool = True, mode: str = "raft") -> tuple[int, dict]:
    """`lock_data_dir`, then make sure the dir is `node_id`'s: its NODE file names the node
    it was made for, and a dir of another node is refused with `FatalNodeError` (the lock is
    given back).  Returns the lock's fd and the NODE file as it stands (`read_node_file`).
    A dir without the file but with a node's files (made before NODE files existed) is
    claimed.  An empty one is claimed only with `create` (in-process nodes, tests); without
    it, `NOT_INITIALIZED` is the refusal.  A dir claimed so, or one whose file names no
    cluster (made before cluster ids), is given `cluster`, the id the node's config derives
    (`cluster_id`); one rejoining keeps none until it learns its peers'; one made for another
    cluster is refused, and so is one holding the files of another `mode` than the node runs
    ("raft" or "zk-election", `STATE_FILE_PREFIXES`): it would start as if empty.

    Why: the dir holds the node's term, vote and log, which the rest of the cluster counts on.
    Another node started on it (a config copied from its neighbour, two configs swapped), or
    this node started on an empty dir after losing its data, would vote and acknowledge without
    what it promised before: two leaders in one term, or a committed entry lost.  `sync=False`
    (the fsync policy "never") leaves the file to the page cache.  Blocks on file I/O."""
    fd = lock_data_dir(data_dir)
    try:
        files = _node_files(data_dir)
        own = STATE_FILE_PREFIXES[0 if mode == "raft" else 1]
        others = [n for n in files if not n.startswith(own)]
        if others:
            raise FatalNodeError(
                f"data dir {data_dir} holds another mode's files ({', '.join(others[:3])}), and "
                f"this config runs {mode} mode: started here, the node would find none of its "
                f"data (a config whose [node] mode changed?)")
        info = read_node_file(data_dir)
        owner = None if info is None else info["node"]
        if owner is None:
            if not create and not files:
                raise FatalNodeError(NOT_INITIALIZED.format(data_dir=data_dir,
                                                            **_NOT_INITIALIZED_BY_MODE[mode]))
            info = {"node": node_id, "cluster": cluster}
            write_node_file(data_dir, node_id, sync, cluster=cluster)
        elif owner != node_id:
            raise FatalNodeError(
                f"data dir {data_dir} belongs to node {owner!r}, and this is node "
                f"{node_id!r}: each node keeps its own data dir (a config copied from another "
                f"node?). Its term, vote and log are {owner}'s; started as {node_id} they could "
                f"elect two leaders in one term or lose acknowledged entries")
        elif info.get("cluster") is None:
            if not info.get("rejoin"):
                info = dict(info, cluster=cluster)
                write_node_file(data_dir, node_id, sync, cluster=cluster)
        elif info["cluster"] != cluster:
            raise FatalNodeError(
                f"data dir {data_dir} was made for another cluster ({info['cluster']}; this "
                f"config's [cluster] name and members make {cluster}): a data dir left from "
                f"another cluster, or the config's name or peers changed since `raftpay node "
                f"init`. Its term and log are that cluster's; started here they could win an "
                f"election and overwrite what this cluster committed")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def data_dir_state(data_dir: str) -> str:
    """"node" (made for a node: it has a NODE file), "files" (a node's files without one: made
    before NODE files existed) or "empty" (nothing of a node's, or no dir)."""
    if os.path.exists(os.path.join(data_dir, NODE_FILE)):
        return "node"
    return "files" if _node_files(data_dir) else "empty"


def init_data_dir(data_dir: str, node_id: str, cluster: str | None, sync: bool = True,
                  rejoin: bool = False) -> None:
    """Make `data_dir` a new node's (`raftpay node init`): create it and write its NODE file,
    naming `cluster` (`cluster_id`); `rejoin` for a node of a running cluster that lost its
    data (`write_node_file`), with `cluster` None: it takes its peers'.  Refused
    with `FatalNodeError` if it already belongs to a node or holds a node's files, or another
    process holds it: initializing is for an empty dir, once."""
    os.makedirs(data_dir, exist_ok=True)
    fd = lock_data_dir(data_dir)
    try:
        info = read_node_file(data_dir)
        if info is not None:
            raise FatalNodeError(f"data dir {data_dir} already belongs to node "
                                 f"{info['node']!r}; nothing to do (start it with `raftpay "
                                 f"node start`)")
        files = _node_files(data_dir)
        if files:
            raise FatalNodeError(f"data dir {data_dir} holds a node's files "
                                 f"({', '.join(files[:4])}); it is no new node's")
        write_node_file(data_dir, node_id, sync, rejoin, cluster)
    finally:
        os.close(fd)


def _settle_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (`gc.freeze`), after a
    ledger was made or restored.

    The ledger's columns are a few long-lived lists that grow by one item per transfer; each
    full collection walked all of them (~30 ms per collection with a million transfers), and the
    short-lived objects of every request (8k rows decode into 8k lists) triggered one every
    second or so: 8% of a node's CPU in batched runs.  Frozen, they are never walked again (they
    are still freed by reference counting when a restore replaces them), and the copy-on-write
    snapshot child no longer dirties their pages by touching their GC headers.  A collection
    first, so no garbage cycle becomes immortal."""
    gc.collect()
    gc.freeze()


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _load_prctl():
    # Looked up at import: a forked child of a threaded process must not dlopen (another
    # thread may have held the loader's lock at the fork).
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child then outlives a killed parent
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


class _SnapshotJob:
    """One snapshot file being written at `path`: by a forked child (`forked`), or already
    written on the Raft thread (`done`).  Owned by the Raft thread, which polls it each tick and
    either renames the finished file into place or abandons it.

    Why a fork and not a thread (measured on the 2-core test machine with a ledger of 3M
    transfers, a 640 MB process): `ledger.snapshot()` takes 0.9-2 s and holds the GIL through its
    final msgpack call, so a writer thread stalled the loop for its whole length (a 2.4 s gap);
    a consistent copy to hand a thread cost the loop 200-600 ms by itself.  The fork costs the
    loop 30-60 ms (page tables), and the child sees the ledger exactly as it was at the fork,
    serialises it on the other core without the GIL, and never takes the ledger lock (another
    thread may have held it at the fork; nothing mutates the ledger but the forking thread).
    `python -m bench.snapshot_bench` measures the stall both ways.

    The child runs at the lowest CPU priority (`SNAPSHOT_WRITER_NICE`): its only deadline is the
    memory the log holds meanwhile, and the replicas fork theirs at the same log index.  At
    normal priority the three writers took a share of the cores equal to the nodes' own while
    they ran (3-node cluster on 2 cores, 8k batches, 101 MB snapshots): commits slowed to one
    every ~0.8 s and the requests in flight took 1.45-1.95 s; at nice 19, 0.86-0.89 s, the
    writers taking 3.3-4.8 s instead of 2.4-2.6 s for the same CPU.

    The child blocks every signal (so a SIGTERM meant for the node cannot run, or wake, the
    parent's handlers through the inherited wakeup fd), dies with its parent (PR_SET_PDEATHSIG),
    closes every inherited fd (a socket the parent closes must not stay open in the child), skips
    garbage collection (it would touch, and so copy, every tracked object's page) and leaves with
    `os._exit` (no atexit, no flushing of the parent's buffers)."""

    __slots__ = ("path", "pid", "result", "started", "cost")

    def __init__(self, path: str, pid: int | None, result: bool | None):
        self.path = path
        self.pid = pid
        self.result = result  # None while the child runs; then whether the file is complete
        self.started = time.monotonic()
        #: Once a forked child is reaped: (its user CPU s, system CPU s, minor page faults).
        self.cost: tuple[float, float, int] | None = None

    @classmethod
    def done(cls, path: str) -> "_SnapshotJob":
        return cls(path, None, True)

    @classmethod
    def forked(cls, path: str, write: Callable[[], None]) -> "_SnapshotJob":
        """Fork a child that runs `write()` (which writes and syncs `path`) and exits 0, or 1 if
        it raised.  Raft thread; returns as soon as the child exists."""
        parent = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    gc.disable()
                    os.nice(SNAPSHOT_WRITER_NICE)
                    if _PRCTL is not None:
                        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
                    if os.getppid() == parent:  # else the parent died before the prctl
                        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                        write()
                        code = 0
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the parent's (the child is gone)
        return cls(path, pid, None)

    def poll(self) -> bool | None:
        """None while writing; True once `path` is complete (and synced); False if it failed."""
        if self.result is None:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: the outcome is unknown
                pid, status, usage = self.pid, 1, None
            if pid:
                self.pid = None
                if usage is not None:
                    self.cost = (usage.ru_utime, usage.ru_stime, usage.ru_minflt)
                self.result = os.waitstatus_to_exitcode(status) == 0
        return self.result

    def abandon(self) -> None:
        """Kill the child if it still runs, reap it, and remove its file.  Blocks only until the
        killed child is gone (at most an fsync in progress)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None
        self.result = False
        _remove_quietly(self.path)


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
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE  # noqa: E402
from pysyncobj.journal import (  # noqa: E402
    FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, FileJournal, MetaStorer, ResizableFile)
from pysyncobj.monotonic import monotonic as _pso_monotonic  # noqa: E402  (CLOCK_MONOTONIC_RAW)
from pysyncobj.poller import POLL_EVENT_TYPE  # noqa: E402
from pysyncobj.serializer import Serializer  # noqa: E402
from pysyncobj.syncobj import _RAFT_STATE  # noqa: E402
from pysyncobj.tcp_connection import TcpConnection  # noqa: E402
from pysyncobj.tcp_server import SERVER_STATE  # noqa: E402
from pysyncobj.transport import TCPTransport  # noqa: E402
from pysyncobj.version import VERSION as _PYSYNCOBJ_VERSION  # noqa: E402

PYSYNCOBJ_VERSION = "0.3.17"
if _PYSYNCOBJ_VERSION != PYSYNCOBJ_VERSION:  # fail at import, not with a subtle divergence later
    raise ImportError(
        f"raftpay.node is written against pysyncobj=={PYSYNCOBJ_VERSION}, found "
        f"{_PYSYNCOBJ_VERSION}; review the adapter and run tests/test_raft_adapter.py")


class _QuietBindFailure(logging.Filter):
    """Upstream logs "failed to perform initialization" with a traceback when its port is
    taken, then raises SyncObjException("BindError"); `Node.start` turns that into one OSError
    that says what happened, so upstream's traceback is only noise on an operator's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "failed to perform initialization"


logging.getLogger("pysyncobj.syncobj").addFilter(_QuietBindFailure())

#: The first byte of our log entries.  Upstream's own types are 0..3; an entry of a type it does
#: not know is skipped by its apply, so a raftpay entry can never reach upstream's unpickling path.
ENTRY_LEDGER = b"R"

#: Our own message between nodes: keeps idle follower<->follower links alive (`rp_ping_peers`).
_MSG_PING = "rp_ping"
#: Our own messages between nodes: the pre-vote round before an election (`_rp_maybe_pre_vote`).
_MSG_PRE_VOTE = "rp_pre_vote"
_MSG_PRE_VOTE_RESPONSE = "rp_pre_vote_response"

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
        # upstream's format, so upstream can read it back
        _replace_file(self.getPath(), _pso_pickle.dumps(meta))


class _MetaUnpickler(pickle.Unpickler):
    """Reads a term/vote file: a dict of ints, strings and None, which need no class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


#: What upstream keeps in the term/vote file, and the types it may have.
_META_FIELDS = {"currentTerm": (int,), "votedForNodeId": (str, type(None)),
                "raftCommitIndex": (int,)}


def _rp_check_meta(journal_path: str, snapshot_path: str) -> None:
    """Refuse to start with a term/vote file that is unreadable, or missing beside a log.

    Upstream's `MetaStorer.getMeta` reads `<journal>.meta` inside a bare `except: pass`, so an
    unreadable or missing file meant term 0 (then the last entry's term) and no vote.  A node
    that voted in a term and came back like that can vote again in the same term and help elect a
    second leader, whose entries then conflict with committed ones (Raft's Election Safety).  The
    file is written atomically (`_DurableMetaStorer`), so a crash cannot leave it half written;
    it is damaged only by the disk, a person, or a power cut with fsync = "never"."""
    meta = journal_path + ".meta"
    fix = (f"the node could vote twice in one term. Restore the file, or move the data dir "
           f"{os.path.dirname(meta) or '.'} aside and start the node empty: it catches up from "
           f"the others")
    try:
        with open(meta, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if _rp_journal_has_entries(journal_path) or os.path.exists(snapshot_path):
            raise FatalNodeError(f"the term/vote file {meta} is missing beside a log; {fix}") \
                from None
        return  # a new node
    except OSError as e:
        raise FatalNodeError(f"cannot read the term/vote file {meta}: {e!r}; {fix}") from e
    try:
        doc = _MetaUnpickler(io.BytesIO(data)).load()
        if not isinstance(doc, dict):
            raise ValueError(f"a {type(doc).__name__}, not a dict")
        for key, value in doc.items():
            types = _META_FIELDS.get(key)
            if types is None or not isinstance(value, types) or isinstance(value, bool) \
                    or (isinstance(value, int) and value < 0):
                raise ValueError(f"{key!r} = {value!r}")
    except Exception as e:
        raise FatalNodeError(f"the term/vote file {meta} is damaged ({e}); {fix}") from e


def _rp_journal_has_entries(journal_path: str) -> bool:
    """Whether upstream's journal file records any entry (its header's last-record offset is
    past the header).  A file too short to say counts as holding entries: damaged, not new."""
    try:
        with open(journal_path, "rb") as f:
            head = f.read(LAST_RECORD_OFFSET_OFFSET + 4)
    except FileNotFoundError:
        return False
    if len(head) < LAST_RECORD_OFFSET_OFFSET + 4:
        return len(head) > 0
    return _JOURNAL_U32.unpack_from(head, LAST_RECORD_OFFSET_OFFSET)[0] > FIRST_RECORD_OFFSET


class _StaleRewrite(Exception):
    """A journal rewrite that the journal moved past (not only appends since it began)."""


_JOURNAL_U32 = struct.Struct("<I")
_JOURNAL_IDX_TERM = struct.Struct("<QQ")


def _rp_journal_records(entries) -> bytes:
    """Journal records in upstream's FileJournal format (`FileJournal.add`): size, index and
    term, command, size again."""
    out = []
    for command, idx, term in entries:
        body = _JOURNAL_IDX_TERM.pack(idx, term) + _pso_pickle.to_bytes(command)
        size = _JOURNAL_U32.pack(len(body))
        out += (size, body, size)
    return b"".join(out)


#: The journal's file doubles up to this size, then grows by this much at a time (each new
#: range is written with zeros, so a bounded step keeps that write and its first sync short).
JOURNAL_GROW_STEP = 8 << 20
_ZEROS = bytes(1 << 20)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view, offset = view[n:], offset + n


def _pwrite_zeros(fd: int, start: int, stop: int) -> None:
    for at in range(start, stop, len(_ZEROS)):
        _pwrite_all(fd, _ZEROS[:min(len(_ZEROS), stop - at)], at)


class _ReservedFile(ResizableFile):
    """Upstream's journal file, written with pwrite into ranges reserved and zero-filled first.

    Upstream grows the file with `mmap.resize` (ftruncate), which leaves a hole: on a full disk
    the first store into it is a SIGBUS, and the node dies with "Bus error" and nothing else.
    Here the new range is reserved with posix_fallocate before upstream maps it, so a full disk
    stops the node with a `FatalNodeError` that names the cause, before the entry could count
    anywhere.

    The range is then written with zeros, and entries go in with pwrite, not through the map.
    On ext4 a reserved range is "unwritten": every fdatasync that covers a first write into it
    also commits the filesystem's journal to record the change, and the three nodes' commits
    queue behind each other on one disk.  Once the zeros are on disk (the first sync after a
    growth writes them) a sync writes only the data.  Stores through the map into a zeroed file
    were slower still (write faults after each sync).  Scratch, 3 processes syncing 3 kB
    appends at once: 196 us per sync through the map into a reserved file, 192 with pwrite,
    143 with pwrite into zeros; in a 3-node cluster at 64 clients the nodes' syncs took
    0.45-0.87 ms instead of 0.94-1.19 ms (perf trace)."""

    def write(self, offset, values):
        mm = self._ResizableFile__mm
        old = len(mm)  # the map's length (`mm.size()` is the file's)
        fd = self._ResizableFile__f.fileno()
        if offset + len(values) > old:
            new = max(old + min(old, JOURNAL_GROW_STEP), offset + len(values))
            try:
                os.posix_fallocate(fd, old, new - old)
                _pwrite_zeros(fd, old, new)
            except OSError as e:
                raise FatalNodeError(f"cannot grow the journal to {new} bytes: {e!r}") from e
            try:
                mm.resize(new)  # the file already has that size: this only maps it
            except (SystemError, OSError):
                self._ResizableFile__extand(0)  # upstream's fallback: map the file anew
                fd = self._ResizableFile__f.fileno()
        try:
            _pwrite_all(fd, values, offset)
        except OSError as e:
            raise FatalNodeError(f"cannot write the journal: {e!r}") from e


class _RaftpayJournal(FileJournal):
    """Upstream's journal (its file a `_ReservedFile`) plus a dirty flag, so the log is synced
    once per append round (`rp_sync`) instead of never, and a compaction that never rewrites the
    file in place.

    `flush()` is `mmap.flush()`, i.e. msync(MS_SYNC), which on Linux syncs the file range and
    the size change like fdatasync.

    Compaction (`deleteEntriesTo`).  Upstream clears the file's header and rewrites the
    remaining entries in place from its start, on the ticking thread: a crash half way left a
    journal holding only a prefix of them (entries after a snapshot, acknowledged, gone), and
    with a background snapshot the remaining entries are those appended while it was written
    (MB under load).  Here the entries are dropped in memory at once, and the file keeps them as
    a dead head: every upstream operation on the file works from its end (appends, suffix
    deletes) or resets it (clear), so a dead head changes nothing but the file's size, and a
    restart drops it again (`_RaftpaySyncObj._rp_align_journal`).  A worker thread then writes
    the remaining entries to a new file and syncs it; the ticking thread appends what came since,
    renames the new file over the journal and syncs the directory (`rp_finish_rewrite`, a few ms),
    and the worker closes the old file (freeing a replaced journal's pages took 140 ms for
    500 MB).  A crash at any point leaves the old file or the new one, both complete."""

    #: A rewrite goes to `<journal>.compact.<n>` until renamed over the journal.
    RP_STAGING_SUFFIX = ".compact."

    def __init__(self, path: str, fsync: bool):
        self.rp_path = path
        folder, name = os.path.split(path)
        for other in os.listdir(folder or "."):
            if other.startswith(name + self.RP_STAGING_SUFFIX):  # a rewrite cut short
                _remove_quietly(os.path.join(folder, other))
        super().__init__(path)
        # Upstream made a plain ResizableFile; from here on it grows through _ReservedFile.
        self._FileJournal__journalFile.__class__ = _ReservedFile
        self.rp_fsync = fsync
        self.rp_dirty = False
        #: Bytes of the commands the journal holds (what a restart would replay): compaction
        #: is also by bytes, since one entry may hold one transfer or 8,000.
        self.rp_live_bytes = sum(len(e[0]) for e in self._FileJournal__journal)
        self.rp_syncs = 0  # count of real syncs, for status and tests
        self.rp_gen = 0  # bumped by every change but an append
        self.rp_rewrite: tuple | None = None  # (staging path, future, count, rp_gen) in flight
        self.rp_rewrites = 0  # files replaced so far (tests)
        self.rp_worker = None  # one thread, made at the first compaction
        self._rp_staging_seq = itertools.count(1)
        if fsync:
            self._FileJournal__metaStorer = _DurableMetaStorer(path + ".meta")

    def add(self, command, idx, term):
        super().add(command, idx, term)
        self.rp_dirty = True
        self.rp_live_bytes += len(command)

    def clear(self):
        super().clear()
        self.rp_dirty = True
        self.rp_gen += 1
        self.rp_live_bytes = 0

    def deleteEntriesFrom(self, entryFrom):
        self.rp_live_bytes -= sum(len(e[0]) for e in self._FileJournal__journal[entryFrom:])
        super().deleteEntriesFrom(entryFrom)
        self.rp_dirty = True
        self.rp_gen += 1

    def deleteEntriesTo(self, entryTo):
        # Upstream calls this right after `_RaftpaySerializer.checkSerializing` renamed a
        # snapshot into place (or at start, `_rp_align_journal`): the entries dropped here exist
        # in that snapshot.  The rewrite syncs the directory first, so that rename is durable
        # before the file loses them.
        kept = self._FileJournal__journal[entryTo:]
        self.rp_live_bytes -= sum(len(e[0]) for e in self._FileJournal__journal[:entryTo])
        self._FileJournal__journal = kept
        self.rp_gen += 1
        worker = self._rp_get_worker()
        if self.rp_rewrite is not None:  # superseded: removed once its write is over
            worker.submit(_remove_quietly, self.rp_rewrite[0])
        staging = f"{self.rp_path}{self.RP_STAGING_SUFFIX}{next(self._rp_staging_seq)}"
        entries = list(kept)  # `kept` itself grows with every append
        future = worker.submit(self._rp_write_staging, staging, entries)
        self.rp_rewrite = (staging, future, len(entries), self.rp_gen)

    def _rp_get_worker(self):
        if self.rp_worker is None:
            import concurrent.futures
            self.rp_worker = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="raft-journal")
        return self.rp_worker

    def rp_close_later(self, f) -> None:
        """Close `f` on the worker thread: the last close of a replaced (unlinked) file frees
        its blocks, which costs the caller ~0.3 ms per MB here (ext4 with discard)."""
        self._rp_get_worker().submit(f.close)

    def _rp_write_staging(self, path: str, entries: list) -> int:
        """Worker thread: sync the directory, then write a complete journal file of `entries`
        and sync it; returns its end offset.  (Plain writes, not upstream's mmap: its page
        faults would be taken holding the GIL.)"""
        if self.rp_fsync:  # the snapshot's rename (see deleteEntriesTo)
            _fsync_dir(os.path.dirname(self.rp_path) or ".")
        body = _rp_journal_records(entries)
        end = FIRST_RECORD_OFFSET + len(body)
        with open(path, "wb") as f:
            f.write(self._rp_header(end))
            f.write(body)
            f.flush()
            # Room for the appends to come, as `_ReservedFile` grows it (here, off the loop).
            _pwrite_zeros(f.fileno(), end, end + JOURNAL_GROW_STEP)
            if self.rp_fsync:
                os.fdatasync(f.fileno())
        return end

    def _rp_header(self, end: int) -> bytes:
        head = self._FileJournal__getDefaultHeader()
        return head[:LAST_RECORD_OFFSET_OFFSET] + _JOURNAL_U32.pack(end)

    def rp_finish_rewrite(self) -> None:
        """Ticking thread, once a tick: put a finished rewrite in place (see the class)."""
        if self.rp_rewrite is None or not self.rp_rewrite[1].done():
            return
        staging, future, count, gen = self.rp_rewrite
        self.rp_rewrite = None
        try:
            end = future.result()
            if gen != self.rp_gen:  # not only appends since: a suffix went, or all of it
                raise _StaleRewrite()
            tail = _rp_journal_records(self._FileJournal__journal[count:])
            with open(staging, "r+b") as f:
                f.seek(end)
                f.write(tail)
                end += len(tail)
                f.seek(0)
                f.write(self._rp_header(end))
                f.flush()
                if self.rp_fsync:
                    os.fdatasync(f.fileno())
            os.replace(staging, self.rp_path)
        except Exception as e:
            # The journal file keeps its dead head (correct, only larger); the next compaction
            # tries again.
            if not isinstance(e, _StaleRewrite):
                log.warning("journal rewrite failed, the journal keeps its old file: %r", e)
            self.rp_worker.submit(_remove_quietly, staging)
            return
        old_file = self._FileJournal__journalFile
        self._FileJournal__journalFile = _ReservedFile(self.rp_path)
        self._FileJournal__currentOffset = end
        self.rp_dirty = False  # all it holds was synced (or need not be)
        self.rp_rewrites += 1
        self.rp_worker.submit(self._rp_close_unsynced, old_file)  # see rp_close_later
        if self.rp_fsync:
            try:
                _fsync_dir(os.path.dirname(self.rp_path) or ".")
            except OSError as e:
                # Appends now go to the new file; if its name is not durable they would be
                # lost to a power cut although acknowledged.
                raise FatalNodeError(f"cannot sync the journal's directory: {e!r}") from e

    @staticmethod
    def _rp_close_unsynced(rfile) -> None:
        """Close a ResizableFile without upstream's msync (a wasted write-out for a file that
        was replaced)."""
        rfile._ResizableFile__mm.close()
        rfile._ResizableFile__f.close()

    def _destroy(self):
        if self.rp_worker is not None:
            self.rp_worker.shutdown(wait=True)  # a rewrite in flight ends (MB and one sync)
            if self.rp_rewrite is not None:
                _remove_quietly(self.rp_rewrite[0])
            self.rp_rewrite = self.rp_worker = None
        super()._destroy()

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
        started = time.monotonic()
        try:
            os.fdatasync(rfile._ResizableFile__f.fileno())
        except OSError as e:
            # After a failed fdatasync the kernel may have dropped the dirty pages and marked
            # them clean, and the next fdatasync then reports success (PostgreSQL's "fsyncgate",
            # 2018): a node that carried on could acknowledge entries it no longer holds.
            raise FatalNodeError(f"cannot sync the journal: {e!r}") from e
        self.rp_syncs += 1
        took = time.monotonic() - started
        if took >= SLOW_SYNC_S:
            # The sync runs on the node's loop: for as long, no commit, no reply and, on a
            # leader, no heartbeat; past an election timeout the followers elect another.
            # Otherwise an operator saw only slow commits or elections, and no cause.
            if self.rp_complain is None:
                self.rp_complain = PeerComplaints(log).warn
            self.rp_complain("slow sync", (
                f"a journal sync took {took * 1000:.0f} ms (fdatasync of {self.rp_path}): "
                f"for that long this node neither committed, answered nor sent heartbeats, "
                f"and a disk this slow costs elections"))

    rp_complain = None  # PeerComplaints(log).warn, made at the first slow sync


#: First byte of every frame between raftpay nodes (`_RaftpayConnection`): which framing
#: follows.  Then the sender's cluster (`cluster_id`, 8 bytes), then:
_FRAME_PLAIN = b"p"  # pickle, no secret configured (loopback only, enforced by the config)
_FRAME_SEALED = b"s"  # seq (8 bytes) | nonce (12) | AES-GCM(pickle), authenticated with the head
#: The framing's first bytes before the cluster id (2026-12-04): "P" and "S", the same without
#: it.  Told apart so that a rolling upgrade's logs say what is going on.
_FRAME_BEFORE_CLUSTER_IDS = b"PS"
_OLDER_PEER = ("a frame of a raftpay from before cluster ids (2026-12-04): upgrade that node; "
               "until then they cannot talk (README, 'A node that lost its data')")
#: The cluster a node stamps while it has none: a node rejoining with an empty dir.
NO_CLUSTER = bytes(8)
#: What may follow a frame's length (as the ints a bytearray holds).
_FRAME_TYPES = frozenset(_FRAME_PLAIN + _FRAME_SEALED + _FRAME_BEFORE_CLUSTER_IDS)
#: Key derivation for the cluster secret; a salt of our own, so the key is not upstream's.
_SEAL_SALT = b"raftpay/raft-transport/aes-gcm/v1"
#: A peer whose frames this node cannot open, or that closes our connections unanswered, is
#: named at most this often (it reconnects every half second).
PEER_COMPLAINT_INTERVAL_S = 60.0
#: Connections in a row a peer closes before answering before this node names it (one is a
#: peer restarting).
SILENT_CLOSES_TO_COMPLAIN = 3
#: A peer this node has had no Raft connection to for this long is named in the log.
PEER_DOWN_REPORT_S = 10.0
#: A journal sync that takes this long is named in the log (once a minute, with a count).
SLOW_SYNC_S = 0.5
_I32 = struct.Struct("i")  # upstream's length prefix: a native int
#: Entries for a follower wait in the leader's memory up to about this much (plus the socket's
#: own buffer and one message) before the leader holds back the next (`_rp_held_back`), unless
#: `Node(append_backlog_bytes=...)` says otherwise.  A follower that keeps up never has more
#: than the entry in flight waiting.
RP_APPEND_BACKLOG_BYTES = 16 * 1024 * 1024
#: With a secret, a connection's first frame (read before anything on it has authenticated)
#: is at most this long (`_rp_parse`); later frames, after one from a peer that holds the
#: secret, are not bounded.  Without a secret nothing authenticates (loopback only), and a
#: dialer's first frame may be a large appendEntries.
FIRST_FRAME_MAX_BYTES = 64 * 1024


class PeerComplaints:
    """Warnings about a misbehaving peer, each kind at most once per PEER_COMPLAINT_INTERVAL_S
    with a count of what was held back since: a misconfigured peer reconnects every half
    second, for as long as it runs.  Not thread-safe (one node's loop)."""

    def __init__(self, logger: logging.Logger):
        self._log = logger
        self._seen: dict = {}  # key -> [last logged (monotonic), held back since]

    def warn(self, key, message: str) -> None:
        more = self.due(key)
        if more is not None:
            self._log.warning("%s%s", message, more)

    def due(self, key) -> str | None:
        """None while `key` was said less than PEER_COMPLAINT_INTERVAL_S ago (counted as held
        back); else what to add to the line saying it ("" or the count held back since)."""
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < PEER_COMPLAINT_INTERVAL_S:
            seen[1] += 1
            return None
        self._seen[key] = [now, 0]
        return f" ({seen[1]} more like it since the last report)" if seen and seen[1] else ""


class _Lasting:
    """Conditions worth a log line only once they last (a peer without a connection, a
    cluster without a leader), and then not on every check: `due(key, now)` returns how long
    `key` has held when a report is due (after PEER_DOWN_REPORT_S, then once per
    PEER_COMPLAINT_INTERVAL_S), else None; `over(key, now)` ends it, returning how long it held
    if it was reported (so its end is worth saying), else None."""

    def __init__(self):
        self._held: dict = {}  # key -> [since, last reported (0: not yet)]

    def due(self, key, now: float) -> float | None:
        held = self._held.setdefault(key, [now, 0.0])
        if now - held[0] < PEER_DOWN_REPORT_S or (
                held[1] and now - held[1] < PEER_COMPLAINT_INTERVAL_S):
            return None
        held[1] = now
        return now - held[0]

    def over(self, key, now: float) -> float | None:
        held = self._held.pop(key, None)
        return now - held[0] if held is not None and held[1] else None


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

    def seal(self, data: bytes, seq: int, cluster: bytes = NO_CLUSTER) -> bytes:
        head = _FRAME_SEALED + cluster + seq.to_bytes(8, "big")
        nonce = os.urandom(12)
        return head + nonce + self._aead.encrypt(nonce, data, head)

    def open(self, frame: bytes) -> tuple[int, bytes]:
        """(seq, plaintext); raises ValueError, saying what the peer likely got wrong, on
        anything not sealed with our key."""
        if frame[:1] == _FRAME_PLAIN:
            raise ValueError("an unsealed frame: the peer runs without a cluster secret, and "
                             "this node has one")
        if frame[:1] != _FRAME_SEALED or len(frame) < 17 + 12 + 16:
            raise ValueError("not a raftpay Raft frame")
        head = frame[:17]
        try:
            plain = self._aead.decrypt(frame[17:29], frame[29:], head)
        except Exception:  # cryptography's InvalidTag (its message is empty)
            raise ValueError("a frame sealed with another cluster secret: every node of a "
                             "cluster needs the same [cluster] secret") from None
        return int.from_bytes(head[9:], "big"), plain


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
    byte and the sender's cluster (`_rp_cluster_refusal`), sealed by `_Sealer` when the
    cluster has a secret — no zlib (~80 us a message to compress ~200 bytes on loopback), no
    Fernet.  The transport turns each connection it makes or accepts into this class before
    anything is sent on it (`rp_adopt`); every node of a cluster runs raftpay, so both ends
    speak it, and a peer that does not (or lacks the secret) fails the first frame and is
    disconnected.  Nothing is unpickled before it authenticates, when sealed.

    The length prefix is upstream's.  The buffers are not: unsent bytes are a `_SendQueue`, and
    received bytes a bytearray read from an offset (`rp_rpos`), so a large transfer costs linear
    time (upstream copied the whole buffer per send, per read and per message).
    `rp_send_seq`/`rp_recv_seq` number the frames of one TCP connection (reset on disconnect,
    since upstream reuses the object)."""

    rp_transport = None  # the `_RaftpayTransport` that adopted it
    rp_dialed = None  # the peer's node, on a connection this node dials (upstream reuses it)
    rp_frames_in = 0  # frames read since this TCP connection opened
    rp_accepted_at = None  # when this node accepted it (a connection a peer dialed)

    @classmethod
    def rp_adopt(cls, conn: TcpConnection, transport=None, dialed=None) -> TcpConnection:
        if type(conn) is TcpConnection:
            conn.__class__ = cls
            conn.rp_send_seq, conn.rp_recv_seq, conn.rp_rpos = 0, 0, 0
        conn.rp_transport = transport
        conn.rp_dialed = dialed
        return conn

    def send(self, message):
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = _pso_pickle.dumps(message)
        transport = self.rp_transport
        cluster = NO_CLUSTER if transport is None else transport.rp_cluster
        if self.encryptor:
            self.rp_send_seq += 1
            data = self.encryptor.seal(data, self.rp_send_seq, cluster)
        else:
            data = _FRAME_PLAIN + cluster + data
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
            if not incoming:
                self._rp_closed_by_peer()
            self.disconnect()
            return False
        buf = self._TcpConnection__readBuffer
        if type(buf) is not bytearray:  # upstream resets it to bytes() on (dis)connect
            buf = self._TcpConnection__readBuffer = bytearray(buf)
            self.rp_rpos = 0
        buf += incoming
        return True

    def _TcpConnection__processParseMessage(self):
        # Upstream handles the messages of a read one by one until this returns None; the acks
        # they cause wait for the end of the pass, so one sync covers all their entries.
        transport = self.rp_transport
        message = self._rp_parse()
        if transport is not None:
            if message is None:
                transport.rp_flush_acks()
            else:
                transport.rp_begin_acks()
        return message

    def _rp_parse(self):
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
        have = len(buf) - pos - 4
        if have and buf[pos + 4] not in _FRAME_TYPES:
            # A client frame's length is big-endian (read here as a huge native int), and the
            # client then waits for an answer that never comes: say so at once, and close.
            if self.rp_dialed is None:
                self._rp_answer_client(bytes(buf[pos:]))
            self._rp_refused(
                "not a raftpay Raft frame: a raftpay client (or another program) on the Raft "
                "port? Clients connect to the nodes' client_addr" if self.rp_dialed is None else
                f"not a raftpay Raft frame: is {self.rp_dialed.address} the peer's raft_addr, "
                f"or its client_addr (or another program's port)?")
            self.disconnect()
            return None
        if n <= 0:
            self._rp_refused(f"a frame of {n} bytes announced: not a raftpay Raft frame")
            self.disconnect()
            return None
        if n > FIRST_FRAME_MAX_BYTES and not self.rp_frames_in and self.encryptor:
            # A frame is buffered whole before it can be opened, and with a secret the first
            # frame on a connection, either way, is upstream's key exchange (32 bytes, sealed).
            # Anyone who reaches the port could otherwise make the node hold gigabytes unopened.
            self._rp_refused(f"a first frame of {n} bytes announced (a node's first frame is "
                             f"its key, under {FIRST_FRAME_MAX_BYTES} bytes): not a raftpay "
                             f"peer")
            self.disconnect()
            return None
        if have < n:
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
        cluster = data[1:9]
        try:
            if data[:1] in _FRAME_BEFORE_CLUSTER_IDS:
                raise ValueError(_OLDER_PEER)
            refusal = self._rp_cluster_refusal(cluster)
            if refusal:
                raise ValueError(refusal)
            if self.encryptor:
                seq, data = self.encryptor.open(data)
                if seq <= self.rp_recv_seq:
                    raise ValueError(f"frame {seq} after {self.rp_recv_seq}: replayed")
                self.rp_recv_seq = seq
            elif data[:1] == _FRAME_PLAIN:
                data = data[9:]
            else:
                raise ValueError("a sealed frame: the peer has a cluster secret, and this node "
                                 "has none")
            message = _pso_pickle.loads(data)
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
        except Exception as e:
            self._rp_refused(str(e) or type(e).__name__)
            self.disconnect()
            return None
        transport = self.rp_transport
        if transport is not None and transport.rp_cluster == NO_CLUSTER:
            transport.rp_cluster = cluster  # authenticated, with a secret (see the refusal)
        if not self.rp_frames_in and self.rp_dialed is not None and transport:
            transport.rp_silent_closes.pop(self.rp_dialed, None)  # it answers us
        self.rp_frames_in += 1
        return message

    def _rp_answer_client(self, data: bytes) -> None:
        """`data` begins with a raftpay client's request on the Raft port: answer it with
        `invalid_request` naming the client port, best effort, before the connection closes.
        Closed without an answer, the client could not tell that nothing was applied: it
        retried for its whole deadline and reported the write's outcome as unknown."""
        (n,) = wire.PREFIX.unpack_from(data)  # the caller saw 5 bytes or more
        if len(data) < 4 + n:
            return  # not all of it yet: the close says enough
        owner = getattr(getattr(self.rp_transport, "_syncObj", None), "_rp_owner", None)
        if owner is None:
            frame = wire.wrong_port_reply(data[4:4 + n], "a raftpay node's Raft port", None)
        else:
            frame = wire.wrong_port_reply(
                data[4:4 + n], f"node {owner.node_id}'s Raft port ({owner.raft_addr})",
                owner.client_addr)
        if frame is not None:
            try:
                self._TcpConnection__socket.send(frame)
            except OSError:
                pass

    def _rp_cluster_refusal(self, cluster: bytes) -> str | None:
        """Why a frame stamped with `cluster` is refused, None if it is not.  A node reads the
        frames of its own cluster, and those of a node with none yet (rejoining with an empty
        dir, it abstains until it caught up); a node with none reads any, and takes the cluster
        of the first that opens (`_rp_parse`: with a secret, only once it authenticated; the
        node writes it down when its rejoin ends, `Node._end_rejoin`).

        Why: a node of another cluster (an old cluster's node started again, with its own dir
        and config, on ports this cluster now uses) holds that cluster's term and log; it
        could win an election here and overwrite what this cluster committed.  A dir of
        another cluster under this cluster's config is refused before that (`claim_data_dir`)."""
        transport = self.rp_transport
        own = NO_CLUSTER if transport is None else transport.rp_cluster
        if cluster == own or cluster == NO_CLUSTER:
            return None
        if len(cluster) < 8:
            return "not a raftpay Raft frame"
        if own == NO_CLUSTER:
            return None
        return (f"the peer's data dir was made for another cluster ({cluster.hex()}; this "
                f"node's is {own.hex()}): a data dir left from another cluster, or configs "
                f"of two clusters mixed? A node keeps the cluster its data dir was made for "
                f"(README, 'A node that lost its data')")

    def _rp_peer(self) -> tuple[str, int] | None:
        try:
            return self._TcpConnection__socket.getpeername()[:2]
        except (AttributeError, OSError):
            return None

    def _rp_refused(self, reason: str) -> None:
        peer = self._rp_peer()
        where = f" from {peer[0]} (port {peer[1]})" if peer else ""
        message = f"dropping a Raft connection{where}: {reason}"
        if self.rp_transport is None:
            log.warning("%s", message)
        else:  # a misconfigured peer reconnects every half second: once a minute is enough
            self.rp_transport.rp_complain((peer[0] if peer else None, reason), message)

    def _rp_closed_by_peer(self) -> None:
        """The peer closed the connection.  A connection we dialed that it closed before its
        first frame is what a peer that cannot open ours does (with a secret, the accepting
        side always answers the dialer's first frame at once); the transport names that peer
        once several connections in a row went so."""
        node, transport = self.rp_dialed, self.rp_transport
        if node is not None and transport is not None and self.rp_frames_in == 0:
            transport.rp_silent_close(node)

    def disconnect(self):
        self.rp_send_seq, self.rp_recv_seq, self.rp_rpos = 0, 0, 0
        self.rp_frames_in = 0
        super().disconnect()


class _RaftpayTransport(TCPTransport):
    """Upstream's TCP transport with two stamps on outgoing Raft messages.

    * append_entries carries `rp_seq`, the leader's round number (for ReadIndex).
    * next_node_idx (a follower's acknowledgement) first makes the log durable, then carries the
      round it answers and the follower's term, so the leader counts only acks of its own term.
      While the messages of one read are handled (`_RaftpayConnection`), acks wait, and the end of
      the read syncs once for all of them: upstream acknowledged, so here synced, per message.
    Doing it here covers every code path that acknowledges, including upstream's snapshot
    install and chunked transmissions."""

    def addNode(self, node):
        super().addNode(node)  # makes the outgoing connection object, if we are the dialer
        conn = self._connections.get(node)
        if conn is not None:
            _RaftpayConnection.rp_adopt(conn, self, dialed=node)

    def _onNewIncomingConnection(self, conn):
        conn = _RaftpayConnection.rp_adopt(conn, self)
        conn.rp_accepted_at = _pso_monotonic()
        super()._onNewIncomingConnection(conn)

    def _onTick(self):
        # Upstream closes its listening socket at the first accept that fails (EMFILE, a
        # connection aborted before it was accepted, ...) and binds only until it first
        # succeeds: the peers that dial this node could never reach it again, until a restart.
        # Bind it again (upstream's own bind, retried every bindRetryTime).
        server = self._server
        if (self._ready and server is not None
                and server._TcpServer__state == SERVER_STATE.UNBINDED):
            self._ready = False
            self.rp_complain("unbound", (
                f"this node's Raft port ({self._selfNode.address}) stopped accepting "
                f"connections (an accept failed: out of file descriptors, or a connection "
                f"aborted as it came); binding it again"))
        super()._onTick()

    def rp_drop_strangers(self) -> int:
        """Close the incoming connections that have not said which peer they are within the
        connection timeout; returns how many.  Upstream keeps such a connection until it sends
        something, which an idle one never does: 500 idle connections to a node's Raft port
        (a health check that does not close, a scanner) held 500 descriptors for as long as
        they stayed open.  A peer finishes its handshake in a round trip, and itself gives up
        on a connection after the same timeout."""
        limit = self._syncObj._SyncObj__conf.connectionTimeout
        now = _pso_monotonic()
        stale = [c for c in self._unknownConnections
                 if c.rp_accepted_at is not None and now - c.rp_accepted_at > limit]
        for conn in stale:
            self._unknownConnections.discard(conn)
            conn.disconnect()
        if stale:
            self.rp_complain("strangers", (
                f"closed {len(stale)} Raft connection(s) that did not say which peer they are "
                f"within {limit:g} s: something other than a peer (a health check, a scanner) "
                f"connects to this node's Raft port, or a peer was too busy to finish its "
                f"handshake"))
        return len(stale)

    def _onIncomingMessageReceived(self, conn, message):
        # Upstream drops a connection whose node introduces itself by an address it does not
        # know without a word; both sides then wait for ever (the introduction is the address
        # the dialer's own config gives it, after the key exchange when there is a secret).
        if (isinstance(message, str) and message != "readonly"
                and message not in self._nodeAddrToNode
                and (not self._syncObj.encryptor or conn.sendRandKey)):
            self.rp_complain(("stranger", message), (
                f"a node introduced itself as {message}, which is not one of this node's peers "
                f"({', '.join(sorted(self._nodeAddrToNode))}): does its config list it at "
                f"another address than this node's does?"))
        super()._onIncomingMessageReceived(conn, message)

    #: Acknowledgements held back while the messages of one read are handled (None: not in
    #: such a pass); `rp_flush_acks` syncs once and sends them.
    rp_acks: list | None = None

    def __init__(self, syncObj, *args, **kwargs):
        #: The cluster stamped on our frames and expected on the peers' (`_rp_cluster_refusal`).
        self.rp_cluster = getattr(syncObj, "_rp_cluster", NO_CLUSTER)
        self.rp_complain = PeerComplaints(log).warn
        self.rp_silent_closes: dict = {}  # node -> connections in a row it closed unanswered
        super().__init__(syncObj, *args, **kwargs)  # adds the nodes (`addNode`)

    def rp_silent_close(self, node) -> None:
        n = self.rp_silent_closes[node] = self.rp_silent_closes.get(node, 0) + 1
        if n >= SILENT_CLOSES_TO_COMPLAIN:
            self.rp_complain(("silent", node), (
                f"the peer at {node.address} closed {n} Raft connections in a row before "
                f"answering on any: a node does that when it cannot open our frames, or "
                f"will not (check that it has the same [cluster] secret as this node, runs a "
                f"raftpay from after 2026-12-04 (frames with cluster ids), and that this "
                f"node's data dir was made for its cluster: cluster {self.rp_cluster.hex()})"))

    def rp_begin_acks(self) -> None:
        if self.rp_acks is None:
            self.rp_acks = []

    def rp_flush_acks(self) -> None:
        """One sync for every entry the messages of a read appended, then their acks."""
        acks, self.rp_acks = self.rp_acks, None
        if acks and self._syncObj._rp_owner._fatal is None:  # failed since: acknowledge nothing
            self._syncObj._rp_journal_sync()
            for node, message in acks:
                self._rp_send(node, message)

    def send(self, node, message):
        so = self._syncObj
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "append_entries":
            if self._rp_held_back(node, message):
                return True  # upstream goes on as if sent; this follower's round is over
            message["rp_seq"] = so._rp_round
        elif kind == "next_node_idx":
            if so._rp_owner._fatal is not None:
                return False  # a replica that failed to load or apply acknowledges nothing
            if so._rp_in_seq is not None:
                message["rp_seq"] = so._rp_in_seq
                message["rp_term"] = so._SyncObj__raftCurrentTerm
            if self.rp_acks is not None:
                self.rp_acks.append((node, message))
                return True
            so._rp_journal_sync()
        return self._rp_send(node, message)

    def _rp_held_back(self, node, message) -> bool:
        """Flow control: True, and this follower's round paused, if the message carries log
        entries and `append_backlog_bytes` already wait unsent for it.  Upstream sends every
        entry past a follower's nextIndex in each round, and the socket takes only what the
        follower reads: a follower alive but slower than the writes (a slow disk, a starved
        CPU) kept every entry since it fell behind in the leader's memory (scratch: 8k batches,
        a follower stopped 5/6 of the time, the leader 376-573 MB above its healthy follower
        at worst in 45 s; 28-51 MB with this).  The entries stay unsent: nextIndex goes back to
        the first of them, and past the log for the rest of the round (`rp_pause`, as for a
        snapshot's chunks), so a later round sends them once what waits has drained.  An entry
        too large for one message goes in chunks: held back at its "start", with the rest of
        its chunks in this round."""
        chunk = message.get("transmission")
        if chunk is None:
            entries = message.get("entries")
            if not entries:
                return False  # a heartbeat
            first = entries[0][1]
        elif chunk == "start":
            first = message["prevLogIdx"] + 1
        else:
            return node in self._syncObj._SyncObj__serializer.rp_paused
        conn = self._connections.get(node)
        if conn is None or conn.getSendBufferSize() < self._syncObj._rp_backlog_bytes:
            return False
        self._syncObj._SyncObj__serializer.rp_pause(node, first)
        return True

    def _rp_send(self, node, message):
        so = self._syncObj
        conn = self._connections.get(node)
        if conn is not None and conn.encryptor and conn.sendRandKey is None:
            # A connection we dialed, its key exchange not finished (the peer's key not back
            # yet): upstream sends once TCP connects, so a message would go without the key
            # and the peer drop the connection, to be dialed again after connectionRetryTime
            # (a busy or stopped peer's pre-votes and heartbeats kept a follower cut off for
            # 10-15 s at a time).  To Raft it is a message lost on the way.  Upstream checks a
            # connection's read timeout when it sends: so does this, or a key that never comes
            # back (a partition) would hold the connection open, and unused, for good.
            conn._TcpConnection__processConnectionTimeout()
            return False
        ok = super().send(node, message)
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

    def __init__(self, loop, on_event: Callable[[], None],
                 on_fatal: Callable[[FatalNodeError], None]):
        self._loop = loop
        self._on_event = on_event
        self._on_fatal = on_fatal
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
        except FatalNodeError as e:
            # Raised while a read was handled (a message, the sync before its acks), outside the
            # tick that would catch it; asyncio would log it and go on.  `on_fatal` makes the
            # replica acknowledge nothing from here on, and its next tick stops it.
            self._on_fatal(e)
            raise
        finally:
            self._on_event()


class _RaftpaySerializer(Serializer):
    """Upstream's snapshot file handling with the snapshot written in the background.

    Upstream's `serialize` calls the serializer hook and renames its temp file into place in one
    call on the ticking thread.  Here `serialize` only starts a writer (`begin(last, prev) ->
    _SnapshotJob`, the owner's `_begin_snapshot`), `checkSerializing` polls it once a tick, and
    when it has finished the ticking thread renames the file to `fullDumpFile` and reports
    SUCCESS, upon which upstream (same call, `__tryLogCompaction`) drops the journal entries up
    to the snapshot (from memory at once, from the file in the background).  So:

    * the file at `fullDumpFile` is always a complete one (synced before its rename; the rename
      is synced before the journal file loses an entry), and it is replaced only on the ticking
      thread: upstream's leader may open it for a transmission at any time (a writer in progress
      does not pause transmissions; on SUCCESS those in flight are cancelled, since the entries
      after the old snapshot were just dropped and the follower would need a new one anyway);
    * a follower that installs the leader's snapshot abandons its own writer first, so an older
      snapshot of its own can never be renamed over the installed one;
    * stopping abandons the writer (kills and reaps the child, removes its file);
    * at start (not at an install), a journal that still holds entries the snapshot covers
      (a crash between the rename and the compaction) is compacted to the snapshot instead of
      being cleared by upstream (`_RaftpaySyncObj._rp_align_journal`)."""

    #: After a writer failed (full disk, fork refused), wait this long before the next try.
    RP_RETRY_S = 1.0
    #: A round adds at most this much of a snapshot for one follower, and nothing while this
    #: much of it waits unsent; the next round goes on (see `getTransmissionData`).
    RP_TRANSMIT_ROUND_BYTES = 1024 * 1024
    RP_TRANSMIT_BACKLOG_BYTES = 2 * 1024 * 1024
    #: While a snapshot is being sent, a new compaction waits (a placed snapshot restarts the
    #: transmissions), unless the log grows past this many times logCompactionMinEntries, or
    #: its bytes past this many times `rp_min_bytes`.
    RP_DEFER_FACTOR = 4
    #: A compaction writes the whole ledger to drop the log's entries, and a follower that
    #: missed entries dropped that way needs the whole snapshot instead of the entries: so it
    #: waits until the entries take as many bytes as the snapshot it replaces, unless the log
    #: holds this many times logCompactionMinEntries (upstream keeps every entry in memory).
    RP_ENTRIES_CAP_FACTOR = 20
    #: The replicas take turns to start a large compaction (`rp_my_turn`): the k-th of n may
    #: start one in the first RP_TURN_START_S of every n-th window of RP_TURN_S (wall clock),
    #: once the snapshot in place takes RP_TURN_MIN_BYTES (a smaller one is written in well
    #: under a second, and tests and small ledgers compact at once).
    RP_TURN_S = 10.0
    RP_TURN_START_S = 4.0
    RP_TURN_MIN_BYTES = 16 * 1024 * 1024
    rp_wall = staticmethod(time.time)  # the clock the turns are read from (tests replace it)
    rp_snapshot_bytes = 0  # size of the snapshot file in place (0: none)
    #: (k, n): this node is the k-th of the cluster's n nodes by address (`rp_stagger`).
    rp_rank = (0, 1)

    def __init__(self, so, conf: SyncObjConf, fsync: bool,
                 min_bytes: int = LOG_COMPACTION_BYTES):
        # Upstream's own fork is never used: `serialize` below replaces the code that forks.
        super().__init__(conf.fullDumpFile, conf.logCompactionBatchSize, False, conf.serializer,
                         conf.deserializer, None)
        self.rp_so = so
        self.rp_min_entries = conf.logCompactionMinEntries
        self.rp_min_bytes = min_bytes  # bytes of log that start a compaction (`rp_compact_due`)
        self.rp_begin = conf.serializer
        self.rp_fsync = fsync
        self.rp_job: _SnapshotJob | None = None
        self.rp_installing = False
        self.rp_installs = 0  # snapshots installed from a leader
        self.rp_round_bytes: dict = {}  # node -> snapshot bytes added in this round
        self.rp_paused: dict = {}  # node -> its real nextIndex, while paused in this round
        self.rp_retry_at = 0.0
        self.rp_out_end: dict = {}  # leader: node -> bytes sent of its snapshot so far
        self.rp_in_offset = 0  # follower: bytes of the incoming snapshot received in order
        self.rp_gaps = 0  # follower: incoming snapshots dropped for a gap (status, tests)
        self.rp_placed = 0  # snapshots this node wrote and put in place since it started

    def serialize(self, data, id):
        """Upstream, on the ticking thread: `data` is (None, last applied entry, the entry
        before it, cluster); on SUCCESS upstream drops the journal up to `id` (prev's index)."""
        if self.rp_job is not None or time.monotonic() < self.rp_retry_at:
            return
        log_ = self.rp_so._SyncObj__raftLog
        if (self._Serializer__transmissions
                and len(log_) < self.RP_DEFER_FACTOR * self.rp_min_entries
                and log_.rp_live_bytes < self.RP_DEFER_FACTOR * self.rp_min_bytes):
            # Each placed snapshot restarts the transmissions, and a follower whose snapshot
            # takes longer to send than the leader takes to compact would never catch up.
            return
        if (not self.rp_log_outgrew_snapshot()
                and len(log_) < self.RP_ENTRIES_CAP_FACTOR * self.rp_min_entries):
            return
        if not self.rp_my_turn():
            return
        _, last, prev, _cluster = data
        # The writer captures the ledger now, so the snapshot must be of exactly this index.
        assert last[1] == self.rp_so._SyncObj__raftLastApplied, (last[1], "not the applied index")
        self._Serializer__currentID = id
        try:
            self.rp_job = self.rp_begin(tuple(last), tuple(prev))
        except Exception:
            log.exception("cannot start writing a snapshot; the journal keeps its entries")
            self.rp_retry_at = time.monotonic() + self.RP_RETRY_S

    def rp_stagger(self) -> float:
        """How far past the byte thresholds this node's first compaction waits: 1 + k/n for
        the k-th of n nodes, then 1.

        Every replica holds the same log, so with one threshold they all compacted at the same
        index, at the same moment: three writers at once (on one machine, the nodes' CPU; on
        any, the whole majority slowed together).  Upstream's `logCompactionSplit` gives each
        node a window of its monotonic clock instead, which is not shared between machines.
        Here the first compaction after a start is spread over a third of the threshold per
        node (of 3), and each later one comes a threshold of log after the node's previous:
        the replicas keep that spacing while the log's rate and the snapshot's size are the
        same for all of them."""
        k, n = self.rp_rank
        return 1.0 if self.rp_placed else 1.0 + k / n

    def rp_my_turn(self) -> bool:
        """Whether this node may start a compaction now: always while its snapshot is small;
        for a large one, only at the start of its own window of the wall clock (k-th of every
        n windows of RP_TURN_S, first RP_TURN_START_S of it).

        The spacing by log (`rp_stagger`) does not keep the writers apart: in a run whose
        entries change size (small transfers, then 8k batches) three byte thresholds of
        similar size are all reached within seconds, and when upstream's entry count starts
        the first compaction the replicas stay at the same index for good.  Measured on the
        2-core machine, all three writers of a 300 MB snapshot at once (5-6.5 s each) halved
        a batched run's throughput for their whole length.  Windows of one clock keep them
        apart whatever the log does: a writer has at least RP_TURN_S - RP_TURN_START_S before
        the next node's window opens, and a due compaction waits at most (n - 1) windows
        meanwhile (the log grows by what arrives in that time).  The clocks are the
        machines' own (kept close by NTP); a skew only lets two writers overlap, as before.
        On separate machines this matters less, but a majority that compacts together still
        slows every commit together."""
        k, n = self.rp_rank
        if n == 1 or self.rp_snapshot_bytes < self.RP_TURN_MIN_BYTES:
            return True
        window, into = divmod(self.rp_wall(), self.RP_TURN_S)
        return int(window) % n == k and into < self.RP_TURN_START_S

    def rp_log_outgrew_snapshot(self) -> bool:
        """The log's entries take as many bytes as the snapshot in place (or there is none;
        times `rp_stagger`)."""
        return (self.rp_so._SyncObj__raftLog.rp_live_bytes
                >= self.rp_snapshot_bytes * self.rp_stagger())

    def rp_compact_due(self) -> bool:
        """Upstream counts entries only; by bytes, a compaction is due once the log's entries
        take `rp_min_bytes` (times `rp_stagger`) and have outgrown the snapshot, and none is
        being written."""
        return (self.rp_job is None and self.rp_log_outgrew_snapshot()
                and self.rp_so._SyncObj__raftLog.rp_live_bytes
                >= self.rp_min_bytes * self.rp_stagger())

    def checkSerializing(self):
        job = self.rp_job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        ident = self._Serializer__currentID
        ok = job.poll()
        if ok is None:
            return SERIALIZER_STATE.SERIALIZING, ident
        self.rp_job = None
        if ok:
            try:
                # Not durable yet: the directory is synced by the journal's rewrite before it
                # drops the covered entries from the file (`_RaftpayJournal.deleteEntriesTo`).
                # Until then the journal file holds them, so a power cut that undoes this rename
                # loses nothing.  The replaced snapshot is held open across the rename and
                # closed by the journal's worker: freeing its blocks took the rename 15 ms for
                # 50 MB here.
                try:
                    replaced = open(self._Serializer__fileName, "rb")
                except FileNotFoundError:
                    replaced = None
                size = os.path.getsize(job.path)
                os.replace(job.path, self._Serializer__fileName)
                self.rp_snapshot_bytes = size
                self.rp_placed += 1
                log.info("snapshot in place, the log compacts to index %d: %.1f MB written in "
                         "%.2f s%s", ident, size / 2 ** 20, time.monotonic() - job.started,
                         "" if job.cost is None else " (writer: %.2f s user, %.2f s system "
                         "CPU, %d page faults)" % job.cost)
                if replaced is not None:
                    self.rp_so._SyncObj__raftLog.rp_close_later(replaced)
            except OSError:
                log.exception("cannot put the snapshot in place; the journal keeps its entries")
                ok = False
        if not ok:
            job.abandon()
            self.rp_retry_at = time.monotonic() + self.RP_RETRY_S
            return SERIALIZER_STATE.FAILED, ident
        self.rp_cancel_transmissions()
        return SERIALIZER_STATE.SUCCESS, ident

    def setTransmissionData(self, data):
        """Follower: one chunk, ``((offset, bytes), is_first, is_last)`` (see
        `getTransmissionData`).  A chunk that does not start where the file so far ends drops
        the incoming snapshot: upstream appends whatever arrives, so a chunk lost on the way
        (seen once in a failover run: exactly one 64 KiB chunk missing) was installed as a
        truncated snapshot, which the replica cannot load and stops on.  After a drop the rest
        of that transmission is ignored, the follower's log still does not match, and the
        leader starts the snapshot again from its first chunk."""
        if data is None:
            return False
        try:
            (offset, chunk), is_first, is_last = data
            if type(offset) is not int or not isinstance(chunk, bytes):
                raise ValueError
        except (TypeError, ValueError):
            log.warning("dropping a snapshot chunk that is not ((offset, bytes), first, last)")
            return False
        if is_first:
            self.rp_in_offset = 0
        if offset != self.rp_in_offset or (
                not is_first and self._Serializer__incomingTransmissionFile is None):
            if self._Serializer__incomingTransmissionFile is not None:
                log.warning("snapshot chunk at %d, expected %d: dropping the incoming snapshot; "
                            "the leader will send it again", offset, self.rp_in_offset)
                self._Serializer__incomingTransmissionFile.close()
                self._Serializer__incomingTransmissionFile = None
                self.rp_gaps += 1
            return False
        self.rp_in_offset = offset + len(chunk)
        installed = super().setTransmissionData((chunk, is_first, is_last))
        if installed:
            # The leader's snapshot is in place and upstream loads it next (clearing the
            # journal).  Ours, if one is being written, is older: drop it.
            self.rp_abandon()
            self.rp_installing = True
            self.rp_installs += 1
        return installed

    def deserialize(self):
        installing, self.rp_installing = self.rp_installing, False
        data = super().deserialize()  # (None, last, prev, cluster) from the owner's reader
        try:
            self.rp_snapshot_bytes = os.path.getsize(self._Serializer__fileName)
        except OSError:
            pass
        if not installing:
            self.rp_so._rp_align_journal(prev=data[2], last=data[1])
        return data

    def getTransmissionData(self, transmissionID):
        """The next chunk of the snapshot for follower `transmissionID` (upstream's
        `__sendAppendEntries`, which sends it and asks again), or None to pause until the
        next round.

        Upstream's round keeps sending a follower behind the log's start chunks for up to a
        whole heartbeat period (appendEntriesPeriod), whatever the socket takes: the leader's
        loop stalled 100-600 ms at a time while a follower caught up (3M transfers), and the
        unsent chunks piled up in memory.  Here a round adds at most RP_TRANSMIT_ROUND_BYTES,
        and none while RP_TRANSMIT_BACKLOG_BYTES wait unsent; `Node` sends a round every
        TRANSMIT_ROUND_S while a transmission is on.  To end upstream's loop for this follower
        the pause sets its nextIndex past the log for the rest of the round (upstream then has
        nothing more for it), and `rp_round_end` puts the real one back."""
        conn = self.rp_so._SyncObj__transport._connections.get(transmissionID)
        if ((conn is not None and conn.getSendBufferSize() >= self.RP_TRANSMIT_BACKLOG_BYTES)
                or self.rp_round_bytes.get(transmissionID, 0) >= self.RP_TRANSMIT_ROUND_BYTES):
            nxt = self.rp_so._SyncObj__raftNextIndex
            if transmissionID in nxt:
                self.rp_pause(transmissionID, nxt[transmissionID])
            return None  # upstream sends a "nothing yet" and keeps the transmission's place
        data = super().getTransmissionData(transmissionID)
        if data is False:
            # Upstream returns False when reading the snapshot fails (it has logged why and
            # dropped the transmission), and its own caller then indexes into it: the leader's
            # tick would die.  Pause instead; the next round starts the transmission over.
            self.rp_out_end.pop(transmissionID, None)
            return None
        if data:
            chunk, is_first, is_last = data
            self.rp_round_bytes[transmissionID] = (self.rp_round_bytes.get(transmissionID, 0)
                                                   + len(chunk))
            # Each chunk says where it belongs (`setTransmissionData` checks it); upstream's
            # leader reads only `is_last` from what this returns.
            t = self._Serializer__transmissions.get(transmissionID)
            offset = (t["transmitted"] if t is not None else 0) - len(chunk)
            if is_last and t is None:  # upstream forgot the finished transmission
                offset = self.rp_out_end.pop(transmissionID, 0)
            elif t is not None:
                self.rp_out_end[transmissionID] = t["transmitted"]
            data = ((offset, chunk), is_first, is_last)
        return data

    def rp_pause(self, node, resume_at: int) -> None:
        """Send `node` nothing more in this round, and resume at log index `resume_at` in the
        next: its nextIndex goes past the log (upstream's round then has nothing for it) until
        `rp_round_end` puts `resume_at` back.  The first pause of a round keeps its index."""
        self.rp_paused.setdefault(node, resume_at)
        self.rp_so._SyncObj__raftNextIndex[node] = self.rp_so.rp_last_index() + 1

    def rp_round_start(self) -> None:
        self.rp_round_bytes.clear()

    def rp_round_end(self) -> None:
        nxt = self.rp_so._SyncObj__raftNextIndex
        for node, index in self.rp_paused.items():
            if node in nxt:
                nxt[node] = index
        self.rp_paused.clear()

    def rp_transmitting(self) -> bool:
        return bool(self._Serializer__transmissions)

    def cancelTransmisstion(self, id):  # sic: upstream's name
        # Upstream forgets the transmission of a disconnected node without closing its file.
        t = self._Serializer__transmissions.pop(id, None)
        if t is not None and t.get("file") is not None:
            self.rp_so._SyncObj__raftLog.rp_close_later(t["file"])

    def rp_cancel_transmissions(self) -> None:
        # Closed on the journal's worker: one of them may hold the last reference to a
        # replaced snapshot (see checkSerializing).
        for t in self._Serializer__transmissions.values():
            if t.get("file") is not None:
                self.rp_so._SyncObj__raftLog.rp_close_later(t["file"])
        self._Serializer__transmissions.clear()

    def rp_abandon(self) -> None:
        if self.rp_job is not None:
            self.rp_job.abandon()
            self.rp_job = None

    def rp_destroy(self) -> None:
        self.rp_abandon()
        self.rp_cancel_transmissions()


class _RaftpaySyncObj(SyncObj):
    """PySyncObj with the raftpay fixes.  Driven by exactly one thread through `rp_tick` (never
    autoTick).  `owner` supplies the state machine, `_apply_entry(index, entry) -> replies`
    (`entry` is the whole log command, our type byte included), and `_fatal` (not None once
    the replica must acknowledge nothing more); `conf.serializer` is the owner's
    `begin(last, prev) -> _SnapshotJob` and `conf.deserializer(path) -> (last, prev, None)`
    (see `_RaftpaySerializer`).  All `rp_*` methods must be called on the thread that ticks,
    except the read-only ones `Node.status` uses."""

    def __init__(self, owner, self_addr: str, other_addrs: list[str], conf: SyncObjConf,
                 journal_path: str, fsync: bool, poller: _LoopPoller | None = None,
                 compaction_bytes: int = LOG_COMPACTION_BYTES, cluster: str | None = None,
                 append_backlog_bytes: int = RP_APPEND_BACKLOG_BYTES):
        assert not conf.autoTick, "the adapter must own the tick thread"
        self._rp_backlog_bytes = append_backlog_bytes  # the transport's flow control
        # The transport's (`rp_cluster`), which its __init__ reads; None: not known yet.
        self._rp_cluster = NO_CLUSTER if cluster is None else bytes.fromhex(cluster)
        self._rp_poller = poller  # None: upstream's own (a thread that ticks with a timeout)
        # Our connections seal frames with this, not with upstream's Fernet (see _Sealer).
        self._rp_sealer = _Sealer(conf.password) if conf.password else None
        self._rp_owner = owner
        self._rp_round = 0  # appendEntries rounds sent by this node (any term), for ReadIndex
        self._rp_commit_sent = 0  # commit index carried by the last round
        self._rp_acked: dict = {}  # node -> highest round it acknowledged in our term
        self._rp_in_seq = None  # round number of the appendEntries being handled now
        # Pre-vote (see `_SyncObj__raftElectionDeadline`): our election timer, whether a real
        # election may start now, the pre-vote round in progress as (term, {granting nodes}),
        # and when an appendEntries of a current leader last arrived.
        self._rp_election_at = 0.0
        self._rp_elect_now = False
        self._rp_pre_vote: tuple | None = None
        self._rp_leader_seen = float("-inf")
        # Before upstream reads the term and vote (and swallows any error doing so).
        _rp_check_meta(journal_path, conf.fullDumpFile)
        super().__init__(self_addr, other_addrs, conf=conf, transportClass=_RaftpayTransport)
        # Upstream opened a plain FileJournal in its __init__; nothing has ticked yet, so swap in
        # the durable subclass on the same file (it reads back what upstream just wrote).
        self._SyncObj__raftLog._destroy()
        self._SyncObj__raftLog = _RaftpayJournal(journal_path, fsync)
        # Likewise the snapshot handling; nothing has been serialized or transmitted yet.
        self._SyncObj__serializer = _RaftpaySerializer(self, conf, fsync, compaction_bytes)
        everyone = sorted([self_addr, *other_addrs])
        self._SyncObj__serializer.rp_rank = (everyone.index(self_addr), len(everyone))

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

    # --- pre-vote (Raft thesis §9.6) --------------------------------------------------------
    #
    # Upstream starts an election, with a new term, as soon as its election timer runs out.  A
    # node cut off from the leader for a while therefore comes back with a term far ahead; its
    # first vote request makes the leader step down, and the cluster is without a leader for an
    # election (measured: an isolated follower at term 10 after 3.6 s; on healing, the leader of
    # term 1 deposed and 2.6 s without a leader).  Here a node whose timer runs out first asks
    # the others whether they would vote for it at the next term, without changing anyone's term
    # or vote; a node says yes only if the asker's log is at least as up to date as its own and
    # it has not heard from a leader for a minimum election timeout itself.  Only with a
    # majority of yeses does the real election start.  A node on the wrong side of a partition
    # keeps its term, and rejoins as a follower.  A leadership transfer (timeout_now) skips it.
    #
    # Upstream reads its election timer in one place only, the check in `_onTick` that starts an
    # election (pinned by the adapter's tests); it writes it whenever it restarts the timer.
    # Each write lands in `_rp_election_at` and withdraws the permission to elect, and the
    # check sees the timer only once a pre-vote was won (or a transfer asked for it), so
    # upstream cannot start an election on its own, whatever the timing.

    @property
    def _SyncObj__raftElectionDeadline(self):
        return self._rp_election_at if self._rp_elect_now else float("inf")

    @_SyncObj__raftElectionDeadline.setter
    def _SyncObj__raftElectionDeadline(self, at):
        self._rp_election_at = at
        self._rp_elect_now = False

    #: A node that lost its data and rejoins (`write_node_file(rejoin=True)`): it neither
    #: votes, pre-votes nor stands until `Node` clears this, once its log holds an entry of the
    #: current term that is committed, and with it everything committed before.  It forgot the
    #: entries it acknowledged; a vote from it could elect a leader that lacks them.  Its
    #: acknowledgements of entries it now holds are sound, so it still replicates.
    rp_abstain = False
    #: Peers (addresses) whose last pre-vote answer said they are rejoining: they do not vote,
    #: which `Node._check_leader` names when no leader comes of it.
    rp_rejoining_peers: frozenset = frozenset()

    def _rp_maybe_pre_vote(self) -> None:
        """Before upstream's tick: start a pre-vote round if the election timer ran out."""
        if (self._rp_elect_now or self._SyncObj__selfNode is None or self.rp_abstain
                or self._SyncObj__raftState == _RAFT_STATE.LEADER):
            return
        now = _pso_monotonic()
        if self._rp_election_at >= now or not self._SyncObj__connectedToAnyone():
            return
        # Another round after another randomized timeout if this one does not win.
        self._rp_election_at = now + self._SyncObj__generateRaftTimeout()
        if self._SyncObj__raftLeader is not None:  # as upstream does when its timer runs out
            self._SyncObj__raftLeader = None
            self._SyncObj__onLeaderChanged()
        term = self._SyncObj__raftCurrentTerm + 1
        self._rp_pre_vote = (term, {self._SyncObj__selfNode})
        message = {"type": _MSG_PRE_VOTE, "term": term,
                   "last_log_index": self._SyncObj__getCurrentLogIndex(),
                   "last_log_term": self._SyncObj__getCurrentLogTerm()}
        for node in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(node, message)
        self._rp_count_pre_votes()

    def _rp_count_pre_votes(self) -> None:
        term, granted = self._rp_pre_vote
        if len(granted) > (len(self._SyncObj__otherNodes) + 1) / 2:
            self._rp_pre_vote = None
            self._rp_election_at, self._rp_elect_now = 0.0, True  # upstream elects this tick

    def _rp_on_pre_vote(self, node, message) -> None:
        """Would we vote for `node` at `message["term"]`?  Changes nothing here; the answer
        carries our term, so an asker behind in terms learns it (as etcd does: otherwise a node
        with the most up-to-date log and an old term could never be elected)."""
        mine = (self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex())
        grant = (message["term"] > self._SyncObj__raftCurrentTerm and not self.rp_abstain
                 and self._SyncObj__raftState != _RAFT_STATE.LEADER
                 and (_pso_monotonic() - self._rp_leader_seen
                      >= self._SyncObj__conf.raftMinTimeout)
                 and (message["last_log_term"], message["last_log_index"]) >= mine)
        self._SyncObj__transport.send(node, {
            "type": _MSG_PRE_VOTE_RESPONSE, "term": message["term"], "granted": grant,
            "current_term": self._SyncObj__raftCurrentTerm, "rejoining": self.rp_abstain})

    def _rp_on_pre_vote_response(self, node, message) -> None:
        if bool(message.get("rejoining")) != (node.id in self.rp_rejoining_peers):
            self.rp_rejoining_peers = self.rp_rejoining_peers ^ {node.id}
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        if message["current_term"] > self._SyncObj__raftCurrentTerm:
            # Raft's rule for any answer from a later term: take it, as a follower.
            self._SyncObj__setCurrentTerm(message["current_term"], None)
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._rp_pre_vote = None
            return
        pre_vote = self._rp_pre_vote
        if (pre_vote is None or not message["granted"] or message["term"] != pre_vote[0]
                or pre_vote[0] != self._SyncObj__raftCurrentTerm + 1):
            return
        pre_vote[1].add(node)
        self._rp_count_pre_votes()

    # --- driving ----------------------------------------------------------------------------

    def rp_tick(self, wait_s: float) -> None:
        """One upstream tick (commit, apply, heartbeats, our `_on_tick`, then poll for up to
        `wait_s`).  Anything appended since the last sync is synced first, so the leader's own
        log is durable before the commit computation at the top of the tick counts it; and a
        journal rewritten in the background since the last tick is put in place."""
        self._SyncObj__transport.rp_flush_acks()  # a pass cut short by an exception
        self._rp_journal_sync()
        self._SyncObj__raftLog.rp_finish_rewrite()
        self._rp_maybe_pre_vote()
        self._onTick(wait_s)

    def rp_subscribe_fd(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._poller.subscribe(fd, lambda _fd, _ev: on_readable(), POLL_EVENT_TYPE.READ)

    def rp_unsubscribe_fd(self, fd: int) -> None:
        self._poller.unsubscribe(fd)

    def rp_destroy(self) -> None:
        """Close sockets and files (on the ticking thread, after its last tick)."""
        self._rp_journal_sync()
        # A snapshot being written is abandoned (its child killed and reaped, its file removed):
        # the journal still holds everything it would have covered.  Upstream also leaves a
        # leader's transmission files open.
        self._SyncObj__serializer.rp_destroy()
        self._doDestroy()

    def _rp_align_journal(self, prev: tuple, last: tuple) -> None:
        """At start, after the snapshot was read: if the journal still holds the snapshot's last
        two entries past its head, drop the entries before them.

        That is a crash between renaming a new snapshot into place and compacting the journal.
        Upstream would see a journal whose head is not the snapshot's and clear it, losing every
        entry after the snapshot, acknowledged ones included (the loss of upstream's fork mode:
        its child renames on its own schedule).  Any other mismatch is left to upstream."""
        log_ = self._SyncObj__raftLog
        if len(log_) < 2 or (log_[0] == prev and log_[1] == last):
            return
        k = prev[1] - log_[0][1]
        if 0 < k < len(log_) - 1 and log_[k] == prev and log_[k + 1] == last:
            log.warning("journal starts at %d, before the snapshot's %d: dropping the entries the "
                        "snapshot covers (a compaction was cut short)", log_[0][1], prev[1])
            try:
                log_.deleteEntriesTo(k)
            except Exception as e:
                self._rp_owner._fatal = e  # upstream would carry on with a broken log
                raise

    def rp_transmitting(self) -> bool:
        """Leader: a snapshot is being sent to some follower (it goes on with every round)."""
        return self._SyncObj__serializer.rp_transmitting()

    def rp_snapshot_writing(self) -> bool:
        """A snapshot is being written in the background (read-only; any thread)."""
        return self._SyncObj__serializer.rp_job is not None

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

    def rp_compact_if_due_by_bytes(self) -> None:
        """Have upstream start a compaction at its next tick if one is due by the log's bytes
        (`_RaftpaySerializer.rp_compact_due`)."""
        if self._SyncObj__serializer.rp_compact_due():
            self.forceLogCompaction()

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

    def rp_drop_strangers(self) -> int:
        """See `_RaftpayTransport.rp_drop_strangers`."""
        return self._SyncObj__transport.rp_drop_strangers()

    def rp_ping_peers(self) -> None:
        """Send a keepalive to every connected peer that is not the leader (a leader's own
        appendEntries keep its links busy).  Upstream checks a connection's read timeout only
        when it sends on it, so an idle follower<->follower link is declared dead at the first
        vote request after a quiet period and that vote is lost, costing a whole extra election
        timeout on failover.

        The leader is pinged too while a snapshot from it is coming in: a follower answers the
        chunks of a snapshot with nothing until the install, so after connectionTimeout (3.5 s)
        of chunks the leader's side of the link read as dead and was dropped, and a snapshot
        that takes longer than that to send (100 MB here) was never received whole."""
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        leader = self._SyncObj__raftLeader
        receiving = self._SyncObj__serializer._Serializer__incomingTransmissionFile is not None
        transport = self._SyncObj__transport
        for n in self._SyncObj__otherNodes:
            if (n != leader or receiving) and self.isNodeConnected(n):
                transport.send(n, {"type": _MSG_PING})

    def rp_cluster(self) -> str | None:
        """The cluster this node stamps on its frames (`cluster_id`): its data dir's, or one
        it took from its peers while it had none; None while it has none."""
        cluster = self._SyncObj__transport.rp_cluster
        return None if cluster == NO_CLUSTER else cluster.hex()

    def rp_dials(self, addr: str) -> bool:
        """True if this node opens the connection to the peer at `addr`, False if it waits for
        the peer to (upstream: the greater address dials; one connection per pair)."""
        transport = self._SyncObj__transport
        return transport._shouldConnect(transport._nodeAddrToNode[addr])

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
        elif kind in ("request_vote", "response_vote"):
            if kind == "request_vote" and self.rp_abstain:
                return  # no answer: to the candidate, a node that is slow to vote
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        elif kind == "timeout_now":
            if self.rp_abstain:
                return  # it may not stand either
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            if self._rp_election_at == 0:  # upstream accepted it: the leader asks us to elect
                self._rp_elect_now = True  # now, without a pre-vote its followers would refuse
        elif kind == _MSG_PRE_VOTE:
            self._rp_on_pre_vote(node, message)
        elif kind == _MSG_PRE_VOTE_RESPONSE:
            self._rp_on_pre_vote_response(node, message)
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
        self._rp_leader_seen = _pso_monotonic()  # a current leader: no pre-vote for others
        if "prevLogIdx" not in message:
            self._rp_on_snapshot_chunk(node, message)
            return
        if message.get("transmission") in ("start", "process"):
            # The first chunks of a large entry (buffered, answered without success, commit
            # index untouched) are correct upstream.
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

    def _rp_on_snapshot_chunk(self, node, message):
        """Follower side of a snapshot transmission: one chunk (`serialized`), or None when the
        leader has nothing to send yet.  Upstream writes the chunk and installs the snapshot
        after the last one (`_RaftpaySerializer.setTransmissionData`), and that is kept.  Two
        things are not:

        * upstream raises the commit index to min(leader's, own last index) on every such
          message, over entries of this follower's log that nothing verified (a stale suffix of
          an old term would be applied, and read by follower reads, until the install replaced
          the ledger).  Here only an install moves it, to the installed snapshot's index;
        * upstream restarts the election timer when the message arrives, and installing a large
          snapshot (restoring the ledger) takes seconds: the follower then timed out at its next
          tick and started an election against the leader it had just heard from (seen with 3M
          transfers: 7 s).  Here the timer restarts when the install is over."""
        serializer = self._SyncObj__serializer
        installs = serializer.rp_installs
        SyncObj._SyncObj__onMessageReceived(
            self, node, dict(message, commit_index=self._SyncObj__raftCommitIndex))
        self._SyncObj__leaderCommitIndex = message["commit_index"]
        if serializer.rp_installs == installs:
            return
        applied = self._SyncObj__raftLastApplied  # the snapshot's last index, committed
        if applied > self._SyncObj__raftCommitIndex:
            self._SyncObj__raftCommitIndex = applied
            self._SyncObj__raftLog.setRaftCommitIndex(applied)
        if not self._SyncObj__transferInProgress:  # as upstream's append_entries handling
            self._SyncObj__raftElectionDeadline = (_pso_monotonic()
                                                   + self._SyncObj__generateRaftTimeout())

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
        serializer = self._SyncObj__serializer
        serializer.rp_round_start()
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            serializer.rp_round_end()  # the nextIndex of followers paused in this round

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
               socket_buffer_bytes: int = 2 ** 22,
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
        # msgpack snapshots, not a pickle of our internals.  `serializer` is not upstream's
        # (path, data) hook: `_RaftpaySerializer` calls it as begin(last, prev) -> _SnapshotJob.
        serializer=serializer,
        deserializer=deserializer,
        useFork=False,  # upstream's fork is replaced, not used (see _RaftpaySerializer)
        logCompactionMinEntries=log_compaction_min_entries,
        dynamicMembershipChange=False,
        commandsWaitLeader=False,
        password=secret,  # Fernet on every connection; without it anyone reaching the port
        # could send pickles
        bindAddress=raft_addr,  # only the given interface, not 0.0.0.0
        bindRetryTime=0.1,
        maxBindRetries=3,
        # Upstream sets SO_SNDBUF/SO_RCVBUF to 64 KB (which also turns off the kernel's
        # autotuning) and reads 64 KB at a time: a snapshot reached a restarted follower at
        # 10-30 MB/s, one loop pass per 64 KB.  With 4 MB, 73 MB went in about a second.
        sendBufferSize=socket_buffer_bytes,
        recvBufferSize=socket_buffer_bytes,
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
    `append_entries_batch_bytes` is sent in chunks; once `append_backlog_bytes` of entries wait
    unsent for a follower (one slower than the writes), the leader sends it no more until they
    drain, rather than hold every entry since it fell behind in memory.  `on_apply(index, ts,
    replies)` runs on the Raft thread after each ledger entry is applied on this replica (any
    role).  `ledger_cls` defaults to `raftpay.ledger.Ledger` (`ledger_cls(session_ttl_ms=...)`,
    `.restore(bytes)`).

    Every `log_compaction_min_entries` entries the node snapshots the ledger and drops the
    journal entries the snapshot covers.  With `snapshot_in_background` (the default) a forked
    child writes the snapshot and the Raft thread pauses only for the fork; False writes it on
    the Raft thread (the old way: the node answers nothing and sends no heartbeat meanwhile;
    kept for comparison, and for platforms without fork).  `snapshot_delay_s` is fault
    injection for tests: every snapshot writer pauses that long half way through its file.

    It also compacts once the entries take `log_compaction_min_bytes`.  Either way a
    compaction waits until the entries take as many bytes as the snapshot it would replace
    (unless the log holds 20 times `log_compaction_min_entries`).  An entry holds one transfer
    or 8,000; a restart restores the snapshot and replays the journal after it (~4 us a
    transfer replayed here, ~0.3 us restored); and a follower that missed entries a compaction
    dropped must receive and install the whole snapshot instead.  Counting entries alone, a
    node that took millions of transfers in large batches replayed all of them at each
    restart, and a leader wrote a 125 MB snapshot to drop 5,000 small entries (2 MB) that a
    follower down for a few seconds then needed.

    `freeze_heap` is for a process that hosts this node alone (`raftpay node start` sets it):
    once the ledger is made, and again after every snapshot restore, every object alive is moved
    out of the garbage collector's reach (`_settle_heap`).  Off by default: in a process that
    starts many nodes (tests, embedders), the cycles of objects alive at a freeze that die later
    would never be collected.
    """

    def __init__(self, node_id: str, raft_addr: str, peers: dict[str, str], data_dir: str, *,
                 secret: str | None = None, fsync: str = "always",
                 election_timeout_ms: int = 1000, heartbeat_ms: int | None = None,
                 append_entries_batch_bytes: int = 2 * 1024 * 1024,
                 session_ttl_ms: int = 600_000,
                 on_apply: Callable[[int, int, list], None] | None = None,
                 propose_timeout_s: float = 30.0, read_timeout_s: float | None = None,
                 log_compaction_min_entries: int = 5000, max_pending_proposals: int = 100_000,
                 ledger_cls=None, snapshot_in_background: bool = hasattr(os, "fork"),
                 snapshot_delay_s: float = 0.0, freeze_heap: bool = False,
                 log_compaction_min_bytes: int = LOG_COMPACTION_BYTES,
                 new_data_dir: bool = True, cluster_name: str = "local",
                 client_addr: str | None = None,
                 append_backlog_bytes: int = RP_APPEND_BACKLOG_BYTES):
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
        if log_compaction_min_bytes <= 0:
            raise ValueError("log_compaction_min_bytes must be positive")
        if append_backlog_bytes <= 0:
            raise ValueError("append_backlog_bytes must be positive")
        if node_id in peers:
            raise ValueError(f"peers must list the other nodes only, not {node_id!r} itself")
        addrs = [raft_addr, *peers.values()]
        if len(set(addrs)) != len(addrs):
            raise ValueError(f"raft addresses must be distinct: {addrs}")
        self.node_id = node_id
        self.raft_addr = raft_addr
        #: Where this node's clients connect; told to a client that reaches the Raft port.
        self.client_addr = client_addr
        self.peers = dict(peers)
        self.data_dir = data_dir
        self._dir_lock = -1  # fd of the data dir's LOCK while started (`claim_data_dir`)
        self.fsync = fsync
        self._new_data_dir = new_data_dir  # may claim an empty data dir (`claim_data_dir`)
        self._cluster_name = cluster_name  # `[cluster] name`, one input of `cluster_id`
        self._secret = secret
        self._election_timeout_s = election_timeout_ms / 1000
        self._heartbeat_s = heartbeat_ms / 1000
        self._batch_bytes = append_entries_batch_bytes
        self._backlog_bytes = append_backlog_bytes
        self._session_ttl_ms = session_ttl_ms
        self._on_apply = on_apply
        self._propose_timeout_s = propose_timeout_s
        # A leader without a majority steps down after one election timeout, which answers its
        # pending reads NOT_LEADER/NO_LEADER; this deadline is only the backstop.
        self._read_timeout_s = read_timeout_s or 4 * self._election_timeout_s
        self._compaction_entries = log_compaction_min_entries
        self._compaction_bytes = log_compaction_min_bytes
        self._snapshot_in_background = snapshot_in_background
        self._snapshot_delay_s = snapshot_delay_s
        self._freeze_heap = freeze_heap
        self._snapshot_seq = itertools.count(1)  # names the writers' files
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
        self._closed = threading.Event()  # set once the sockets, files and writer are released
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
        self._next_transmit_round = 0.0
        self._next_peer_check = 0.0
        #: A peer without a Raft connection, the cluster without a leader (`_check_peers`,
        #: `_check_leader`).
        self._lasting = _Lasting()
        # Until this monotonic time, a leader keeps trying to hand leadership over (step_down).
        self._step_down_until = 0.0
        self._next_step_down_try = 0.0
        self._step_down_avoid: frozenset = frozenset()
        # (last log index, log size) as of the last tick: the journal's entries and file are
        # replaced during compaction, so other threads must not read it directly.
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
        if self._so is not None or self._dir_lock >= 0:
            raise RuntimeError("a Node starts once; create a new one to restart")
        os.makedirs(self.data_dir, exist_ok=True)
        # Before touching any file in it: the holder's writer files are removed just below.
        cluster = cluster_id(self._cluster_name, [self.node_id, *self.peers])
        self._dir_lock, owner = claim_data_dir(self.data_dir, self.node_id, cluster,
                                               self.fsync == "always", create=self._new_data_dir)
        try:
            self._start(loop, rejoin=owner.get("rejoin", False), cluster=owner.get("cluster"))
        except BaseException:
            if self._so is None:  # else `_shutdown_raft` released it
                self._release_dir()
            raise

    def _release_dir(self) -> None:
        fd, self._dir_lock = self._dir_lock, -2  # -2: taken once and released
        if fd >= 0:
            os.close(fd)

    def _start(self, loop, rejoin: bool, cluster: str | None) -> None:
        for name in os.listdir(self.data_dir):
            if name.startswith(SNAPSHOT_WRITING_PREFIX):  # a writer's file; a crash left it
                _remove_quietly(os.path.join(self.data_dir, name))
        self._ledger = self._ledger_cls(session_ttl_ms=self._session_ttl_ms)
        if self._freeze_heap:
            _settle_heap()
        conf = _make_conf(raft_addr=self.raft_addr, data_dir=self.data_dir, secret=self._secret,
                          election_timeout_s=self._election_timeout_s,
                          heartbeat_s=self._heartbeat_s, batch_bytes=self._batch_bytes,
                          log_compaction_min_entries=self._compaction_entries,
                          serializer=self._begin_snapshot, deserializer=self._read_snapshot)
        if loop is not None:
            self._loop = loop
            self._loop_thread_id = threading.get_ident()
        journal = os.path.join(self.data_dir, JOURNAL_FILE)
        new_files = [p for p in (journal, journal + ".meta") if not os.path.exists(p)]
        try:
            so = _RaftpaySyncObj(self, self.raft_addr, list(self.peers.values()), conf, journal,
                                 fsync=self.fsync == "always",
                                 poller=(_LoopPoller(loop, self._schedule_tick, self._set_fatal)
                                         if loop else None),
                                 compaction_bytes=self._compaction_bytes, cluster=cluster,
                                 append_backlog_bytes=self._backlog_bytes)
        except pysyncobj.SyncObjException as e:
            # Upstream creates the journal before it binds.  A first start that cannot bind
            # leaves the dir as it found it: an empty journal without its term/vote file would
            # make every later start refuse (`_rp_check_meta`).
            for path in new_files:
                _remove_quietly(path)
            raise OSError(f"cannot bind Raft address {self.raft_addr} (another process holds "
                          f"it?): {e}") from None
        self._so = so
        # Before the first tick, which is the first that could answer a vote.
        so.rp_abstain = rejoin
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
        NOT_LEADER/NO_LEADER, waits READ_NOT_READY), sync and close the log, release the port,
        abandon a snapshot being written (its child is killed and reaped, its file removed; the
        journal still holds what it would have covered).  Blocks up to `timeout_s`.
        Idempotent.  From a callback (the Raft thread) it only asks."""
        if self._so is None or self._stopped.is_set():
            return
        self._stopping = True
        if self._loop is not None:
            if threading.get_ident() == self._loop_thread_id:
                self._shutdown_raft()
            else:
                self._wake()
                # Not `_stopped`: that is set first thing in `_shutdown_raft`, before the port,
                # the files and a snapshot writer in progress are released.
                self._closed.wait(timeout_s)
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
                  journal_syncs=so.rp_journal_syncs(), ready=self._ready.is_set(),
                  rejoining=so.rp_abstain, cluster=so.rp_cluster(),
                  snapshot_writing=so.rp_snapshot_writing())
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

    def _set_fatal(self, error: FatalNodeError) -> None:
        self._fatal = error

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
            self._release_dir()
            self._closed.set()

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
        sent_round = is_leader and (appended or need_round)
        if sent_round:
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
                sent_round = True
        if is_leader and now >= self._next_transmit_round and so.rp_transmitting():
            self._next_transmit_round = now + TRANSMIT_ROUND_S
            if not sent_round:
                so.rp_send_round()
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
        if now >= self._next_peer_check:
            self._next_peer_check = now + 1.0
            peers = so.rp_peers()
            self._check_peers(so, peers, now)
            self._check_leader(so, peers, now)
            so.rp_drop_strangers()
            if so.rp_abstain and so.raftCurrentTerm > 0 and so.rp_committed_in_term():
                self._end_rejoin(so)  # (term 0: the journal's first entry, no leader's)
        so.rp_compact_if_due_by_bytes()
        if is_leader and now < self._step_down_until and now >= self._next_step_down_try:
            self._next_step_down_try = now + self._heartbeat_s
            target = self._step_down_target(so)
            if target is not None:
                so.transferLeadership(target)
        if not self._ready.is_set() and so.isReady() and so.rp_leader_addr() is not None:
            self._ready.set()
        self._published_log = (so.rp_last_index(), so._getRaftLogSize())
        self._published_role = (so.rp_role(), so.raftCurrentTerm, so.rp_leader_addr())

    def _end_rejoin(self, so: _RaftpaySyncObj) -> None:
        """A rejoining node (`rp_abstain`) whose commit index reached an entry of the current
        term holds everything committed before this term (Raft's leader completeness: the
        leader's log did, and ours matches it up to there): it may vote and stand again.  The
        NODE file loses its mark first, so a restart does not abstain again for nothing, and
        names the cluster the node took from its peers."""
        if not clear_rejoin_mark(self.data_dir, self.node_id, self.fsync == "always",
                                 so.rp_cluster()):
            return
        so.rp_abstain = False
        log.info("%s: caught up after rejoining (commit index %d, term %d): votes again",
                 self.node_id, so.raftCommitIndex, so.raftCurrentTerm)

    def _check_leader(self, so: _RaftpaySyncObj, peers: dict, now: float) -> None:
        """With no leader for PEER_DOWN_REPORT_S, say why none can be elected, once per
        PEER_COMPLAINT_INTERVAL_S while it lasts: whose votes a leader needs and which members
        cannot give one (not connected, or rejoining after losing their data: a cluster whose
        other members are down waits for them, and said nothing).  Say when one is back."""
        leader = so.rp_leader_addr()
        if leader is not None:
            lasted = self._lasting.over("leaderless", now)
            if lasted is not None:
                log.info("%s: %s leads, after %.0f s without a leader", self.node_id,
                         self._addr_to_id.get(leader, leader), lasted)
            return
        lasted = self._lasting.due("leaderless", now)
        if lasted is None:
            return
        voters, cannot = [], []
        if so.rp_abstain:
            cannot.append(f"{self.node_id} (this node) is rejoining after losing its data and "
                          f"does not vote until a leader has brought it up to date")
        else:
            voters.append(self.node_id)
        by_id = {self._addr_to_id.get(addr, addr): (addr, p) for addr, p in peers.items()}
        for peer, (addr, p) in sorted(by_id.items()):
            if not p["connected"]:
                cannot.append(f"{peer} is not connected")
            elif addr in so.rp_rejoining_peers:
                cannot.append(f"{peer} is rejoining after losing its data")
            else:
                voters.append(peer)
        members = len(self.peers) + 1
        need = members // 2 + 1
        if len(voters) >= need:
            why = (f"{', '.join(voters)} can vote, enough for one; their elections have not "
                   f"agreed yet")
        else:
            why = f"only {', '.join(voters) or 'none'} can vote: {'; '.join(cannot)}"
        log.warning("%s: no leader for %.0f s: a leader needs the votes of %d of the %d "
                    "members, and %s", self.node_id, lasted, need, members, why)

    def _check_peers(self, so: _RaftpaySyncObj, peers: dict, now: float) -> None:
        """Name a peer this node has had no Raft connection to for PEER_DOWN_REPORT_S, once
        per PEER_COMPLAINT_INTERVAL_S while it lasts, and say when it is back.  Status shows
        `connected: false`, but a cluster that never forms (a peer down, listed at the wrong
        address, or with another secret) otherwise left no trace in any node's log.  The
        message says who dials whom, which is where a wrong address shows.  `peers`:
        `so.rp_peers()`."""
        for addr, p in peers.items():
            peer = self._addr_to_id.get(addr, addr)
            if p["connected"]:
                lasted = self._lasting.over(("down", addr), now)
                if lasted is not None:
                    log.info("%s: Raft connection to %s at %s is back after %.0f s",
                             self.node_id, peer, addr, lasted)
                continue
            lasted = self._lasting.due(("down", addr), now)
            if lasted is None:
                continue
            if so.rp_dials(addr):
                how = ("this node dials it: is it running, at that address, with this "
                       "cluster's secret?")
            else:
                how = (f"it dials this node: is it running, with this node listed at "
                       f"{self.raft_addr} and this cluster's secret?")
            log.warning("%s: no Raft connection to %s at %s for %.0f s (%s)", self.node_id,
                        peer, addr, lasted, how)

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
        if not (self._reads_unassigned or self._reads_quorum or self._reads_apply):
            return  # every tick: three list comprehensions of nothing were 3% of a busy leader
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

    def _begin_snapshot(self, last: tuple, prev: tuple) -> _SnapshotJob:
        """Log compaction (Raft thread, called by the adapter right after applying `last`):
        start writing a snapshot of the ledger as of now into a file of its own.  The adapter
        renames it into place once the job reports it complete, and only then drops entries.

        In the background (default) the Raft thread only forks: the child serialises the
        copy-on-write ledger, so the snapshot is of exactly `last` however far the ledger moves
        meanwhile.  The child must not take `self._lock` (another thread may have held it at
        the fork); it needs no lock, being alone with its copy."""
        path = os.path.join(self.data_dir, f"{SNAPSHOT_WRITING_PREFIX}{os.getpid()}."
                                           f"{next(self._snapshot_seq)}")
        if self._snapshot_in_background:
            ledger = self._ledger
            # The child writes straight from the ledger's columns (`Ledger.snapshot_parts`):
            # views of pages it shares with the parent, not a copy it would fault in.
            return _SnapshotJob.forked(
                path,
                lambda: self._write_snapshot_file(path, last, prev, ledger.snapshot_parts()))
        with self._lock:
            ledger_bytes = self._ledger.snapshot()
        try:
            self._write_snapshot_file(path, last, prev, [ledger_bytes])
        except BaseException:
            _remove_quietly(path)
            raise
        return _SnapshotJob.done(path)

    def _write_snapshot_file(self, path: str, last: tuple, prev: tuple,
                             ledger_parts: list) -> None:
        """Write one snapshot: the ledger and the two log entries upstream resumes from, as one
        msgpack map; then fsync (the writer: a forked child, or the Raft thread).

        The map is written piece by piece so the ledger's bytes (100+ MB for millions of
        transfers), given as the bytes-like parts they are made of, are never copied into one
        document: its value is a bin 32 header followed by the parts, which any msgpack reader
        takes as one bin."""
        views = [memoryview(part).cast("B") for part in ledger_parts]
        n = sum(v.nbytes for v in views)
        if n >= 2 ** 32:
            raise ValueError(f"ledger snapshot of {n} bytes does not fit a msgpack bin")
        packer = msgpack.Packer(use_bin_type=True)
        head = [packer.pack_map_header(5)]
        for key, value in (("format", SNAPSHOT_FORMAT), ("version", SNAPSHOT_VERSION),
                           ("last", list(last)), ("prev", list(prev)), ("ledger", None)):
            head.append(packer.pack(key))
            if key != "ledger":
                head.append(packer.pack(value))
        head.append(b"\xc6" + n.to_bytes(4, "big"))  # bin 32
        sync = self.fsync == "always"
        pause_at = n // 2 if self._snapshot_delay_s else -1  # a half-written file, for the tests

        def write_all(f, data) -> None:  # an unbuffered write may take only part
            while data:
                data = data[f.write(data):]
        with open(path, "wb", buffering=0) as f:
            write_all(f, memoryview(b"".join(head)))
            done = unsynced = 0
            for view in views:
                for pos in range(0, view.nbytes, SNAPSHOT_SYNC_BYTES):
                    chunk = view[pos:pos + SNAPSHOT_SYNC_BYTES]
                    if done <= pause_at < done + chunk.nbytes:
                        write_all(f, chunk[:pause_at - done])
                        time.sleep(self._snapshot_delay_s)
                        chunk = chunk[pause_at - done:]
                        done, pause_at = pause_at, -1
                    write_all(f, chunk)
                    done += chunk.nbytes
                    unsynced += chunk.nbytes
                    if sync and unsynced >= SNAPSHOT_SYNC_BYTES:
                        os.fdatasync(f.fileno())
                        unsynced = 0
            if sync:
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
            doc_last, doc_prev = doc["last"], doc["prev"]
        except Exception as e:
            # Upstream would log and carry on with an empty state machine over a compacted log.
            self._fatal = e
            raise
        with self._lock:
            self._ledger = ledger
        del doc
        if self._freeze_heap:
            _settle_heap()
        return tuple(doc_last), tuple(doc_prev), None

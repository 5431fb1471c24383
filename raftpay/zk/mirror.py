"""Mirror a node's Raft view into ZooKeeper, and follow it from a client.

Design: the mirror observes and never decides.  A node hands `ZkMirror` a `status_fn` that reads
its current view (client address, role, term) without blocking; the mirror's own thread polls it
every `interval_s` and reconciles two ephemeral znodes with it (layout in `raftpay.zk`).  It
writes only when the view changed, and re-reads everything after a reconnect, a new session, a
failed call, and every `resync_s` anyway, so a missed event or a hand-edited znode heals itself
(level-triggered reconciliation, the way kazoo's recipes re-check state after reconnecting rather
than trusting the event that woke them).

Who may hold `/leader`: the node whose Raft term is higher.  A new leader replaces a lower-term
holder (typically a crashed leader whose session has not expired yet) with one ZooKeeper
transaction `delete(version) + create`, so the znode never goes missing in between and a
concurrent change makes the whole transaction fail rather than clobber it.  A node that stops
leading deletes `/leader` only when its own session holds it and the data names it, with the
version it read.  Raft guarantees at most one leader per term, so term order is a total order on
legitimate claims; ties go to the existing holder (unless it is this node's own stale session).

ZooKeeper trouble never reaches the caller: `start()` returns at once even when ZooKeeper is
down, kazoo reconnects forever with a backoff capped at one second, every call from the mirror
thread waits at most `op_timeout_s`, and while disconnected the thread keeps polling `status_fn`
but sends nothing (kazoo would queue the request and block until the connection returns).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping, NamedTuple

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    KazooException,
    NoNodeError,
    RolledBackError,
)
from kazoo.protocol.states import KazooState
from kazoo.recipe.watchers import DataWatch
from kazoo.retry import KazooRetry
from kazoo.security import make_acl, make_digest_acl

from raftpay.codes import RaftpayError

log = logging.getLogger(__name__)
# kazoo logs every failed connection attempt; give it its own name so an operator can quieten
# it during a known ZooKeeper outage without losing the mirror's own messages.
kazoo_log = logging.getLogger("raftpay.zk.kazoo")

ROLES = ("leader", "follower", "candidate")


class ZkUnavailable(RaftpayError):
    """ZooKeeper could not answer before the deadline (down, partitioned, or too slow)."""


class LeaderInfo(NamedTuple):
    """What `/leader` says: which node leads, where clients reach it, and its Raft term."""

    node_id: str
    client_addr: str
    term: int


def cluster_path(root: str, cluster: str) -> str:
    return f"{root.rstrip('/')}/{cluster}"


def members_path(root: str, cluster: str) -> str:
    """Parent of the per-node ephemeral znodes."""
    return f"{cluster_path(root, cluster)}/members"


def leader_path(root: str, cluster: str) -> str:
    return f"{cluster_path(root, cluster)}/leader"


def _check_name(what: str, value: str) -> None:
    # A name becomes one path component; a slash would silently nest it somewhere else.
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ValueError(f"{what} must be a non-empty znode name without '/', got {value!r}")


def _check_root(root: str) -> None:
    if not isinstance(root, str) or not root.startswith("/") or root.rstrip("/") == "":
        raise ValueError(f"root must be an absolute znode path such as '/raftpay', got {root!r}")


def _encode(obj: Mapping[str, Any]) -> bytes:
    # Sorted, compact JSON: equal views give equal bytes, so "changed?" is a byte comparison.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _decode(data: bytes | None) -> dict | None:
    """The JSON object in a znode, or None when it is absent or not ours to read."""
    if not data:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _term_of(obj: dict | None) -> int:
    term = obj.get("term") if obj else None
    # bool is an int subclass; a `true` term is garbage, not term 1.
    return term if isinstance(term, int) and not isinstance(term, bool) else -1


class _KazooLog(logging.LoggerAdapter):
    """kazoo's logger for one client: its lines name the ensemble, and its warnings are said
    once a minute per kind, with a count of the rest (`raftpay.node.PeerComplaints`).

    Why: kazoo warns on every failed attempt, for as long as it runs: once a second while
    ZooKeeper is down, and ~10 times a second against a port that is no ZooKeeper (the reply
    reads as an ended session, and kazoo retries at once).  A config whose `[zk] hosts` named a
    node's client port logged 200 lines of "Session has expired" in 20 s, none saying where;
    such a streak now says what to check."""

    #: "Session has expired" this many times without a connection in between: no ZooKeeper.
    EXPIRED_STREAK = 3

    def __init__(self, hosts: str):
        from raftpay.node import PeerComplaints
        super().__init__(kazoo_log, {})
        self.hosts = hosts
        self._complain = PeerComplaints(kazoo_log).warn
        self._expired = 0  # in a row, since the last connection

    def process(self, msg, kwargs):
        return f"ZooKeeper {self.hosts}: {msg}", kwargs

    def log(self, level, msg, *args, **kwargs):
        if level < logging.WARNING or kwargs.get("exc_info"):
            super().log(level, msg, *args, **kwargs)
            return
        text, kind = str(msg) % args if args else str(msg), str(msg)
        if text.startswith("Session has expired"):
            self._expired += 1
            if self._expired >= self.EXPIRED_STREAK:
                kind = "no zookeeper"
                text += (f" ({self._expired} times in a row, each at once: a server that ends "
                         f"every session it is asked for is likely no ZooKeeper; is [zk] hosts "
                         f"a ZooKeeper ensemble, and not raftpay's ports?)")
        self._complain(("kazoo", kind), f"ZooKeeper {self.hosts}: {text}")

    def on_state(self, state: str) -> None:
        """A state listener (kazoo's thread): a connection ends a streak."""
        if state == KazooState.CONNECTED:
            self._expired = 0


def make_client(
    hosts: str,
    *,
    session_timeout_s: float,
    op_timeout_s: float,
    digest: str | None = None,
) -> KazooClient:
    """A `KazooClient` configured for raftpay (not started).

    Reconnects forever with a backoff capped at 1 s (kazoo's default cap is an hour, so a
    client would take ages to notice that ZooKeeper is back); `client.retry` gives up after
    `op_timeout_s`.  With `digest="user:password"` the client authenticates as that user and
    creates znodes that grant the user everything and the world read access only.
    """
    acl = auth = None
    if digest is not None:
        user, sep, password = digest.partition(":")
        if not sep or not user or not password:
            raise ValueError("digest must look like 'user:password'")
        acl = [
            make_digest_acl(user, password, all=True),
            make_acl("world", "anyone", read=True),
        ]
        auth = [("digest", digest)]
    logger = _KazooLog(hosts)
    client = KazooClient(
        hosts=hosts,
        # kazoo's `timeout` is the session timeout it asks for; the server clamps it to
        # [2, 20] x tickTime.
        timeout=session_timeout_s,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0),
        command_retry=KazooRetry(
            max_tries=5, delay=0.05, backoff=2, max_delay=0.5, deadline=op_timeout_s
        ),
        default_acl=acl,
        auth_data=auth,
        logger=logger,
    )
    client.add_listener(logger.on_state)
    return client


def _close_client(client: KazooClient, timeout_s: float) -> None:
    """Close the session, waiting at most `timeout_s`.

    kazoo's `stop()` waits for its connection thread, which can sit in a connect attempt for a
    whole session timeout when a server hangs (measured: 2.5-4 s with a SIGSTOPped server and a
    4 s session).  A node's shutdown must not wait on ZooKeeper, so the close runs on a daemon
    thread and is left to finish by itself if it takes longer.
    """

    def close() -> None:
        try:
            client.stop()
            client.close()
        except Exception as exc:  # closing must not raise into a shutdown path
            log.debug("zk: error while closing the client: %r", exc)

    closer = threading.Thread(target=close, name="zk-close", daemon=True)
    closer.start()
    closer.join(timeout_s)


class ZkMirror:
    """Keep `/members/<node_id>` and (while leading) `/leader` in step with `status_fn()`.

    Threads: `start()`, `stop()` and `status()` may be called from any thread and never wait for
    ZooKeeper (`stop()` waits at most `timeout_s` for the mirror thread and kazoo to wind down).
    `status_fn` is called only on the mirror's own thread, about every `interval_s`; it must
    return quickly a mapping with `client_addr` (str), `role` ("leader" | "follower" |
    "candidate") and `term` (int >= 0); further keys are ignored.  If it raises or returns
    something else, the mirror records the error and leaves the znodes as they are.
    """

    def __init__(
        self,
        hosts: str,
        cluster: str,
        node_id: str,
        status_fn: Callable[[], Mapping[str, Any]],
        *,
        root: str = "/raftpay",
        digest: str | None = None,
        interval_s: float = 0.2,
        session_timeout_s: float = 4.0,
        op_timeout_s: float | None = None,
        resync_s: float = 5.0,
    ):
        _check_root(root)
        _check_name("cluster", cluster)
        _check_name("node_id", node_id)
        if interval_s <= 0 or session_timeout_s <= 0 or resync_s <= 0:
            raise ValueError("interval_s, session_timeout_s and resync_s must be positive")
        self.hosts = hosts
        self.cluster = cluster
        self.node_id = node_id
        self.interval_s = interval_s
        self.resync_s = resync_s
        # One call may take this long before the thread gives up on it and re-checks later.
        # Half the session timeout: longer than any healthy round trip, shorter than the time
        # kazoo needs to declare a hung server dead (2/3 of the session timeout).
        if op_timeout_s is None:
            op_timeout_s = max(0.5, session_timeout_s / 2)
        self.op_timeout_s = op_timeout_s
        self.member_path = f"{members_path(root, cluster)}/{node_id}"
        self.leader_path = leader_path(root, cluster)
        self._status_fn = status_fn
        self._client = make_client(
            hosts, session_timeout_s=session_timeout_s, op_timeout_s=op_timeout_s, digest=digest
        )
        self._client.add_listener(self._on_state)

        self._stopping = threading.Event()
        self._wake = threading.Event()
        # Set by kazoo's thread on every (re)connection: the next tick re-reads everything.
        self._resync = threading.Event()
        # Set by the watch a leading node keeps on /leader: someone else changed it.
        self._leader_dirty = threading.Event()
        self._thread: threading.Thread | None = None

        # Owned by the mirror thread: what this session has written, so far as we know.
        self._written_session: int | None = None
        self._member_written: dict | None = None
        self._leader_written: dict | None = None
        # The claim that a holder with a term >= ours refused; retried when /leader changes.
        self._leader_blocked: dict | None = None

        # Diagnostics, read by status() from other threads.
        self._lock = threading.Lock()
        self._diag: dict[str, Any] = {
            "state": "not started",
            "last_error": None,
            "last_error_at": None,
            "last_write": None,
            "last_write_at": None,
            "status_calls": 0,
            "writes": 0,
            "in_sync": False,
            "leader_blocked_by": None,
        }

    # --- public ---------------------------------------------------------------------------

    def start(self) -> "ZkMirror":
        """Begin mirroring.  Returns at once; connecting happens in the background."""
        if self._thread is not None:
            raise RuntimeError("ZkMirror.start() called twice")
        self._client.start_async()
        self._thread = threading.Thread(
            target=self._run, name=f"zk-mirror-{self.node_id}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop mirroring and close the session, so the znodes vanish at once (when ZooKeeper is
        reachable; otherwise they vanish when the session expires).  Idempotent.  Blocks up to
        about `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._wake.set()
        # Close the session first: that removes the znodes at once, and it fails any call the
        # mirror thread is waiting on, so the join below is short.
        _close_client(self._client, timeout_s)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._diag["state"] = "stopped"
            self._diag["in_sync"] = False

    def __enter__(self) -> "ZkMirror":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        """A snapshot for diagnostics; never blocks on ZooKeeper.

        Keys: `connected`, `state` (kazoo's), `session_id` (hex or None), `in_sync` (the last
        tick ended with ZooKeeper matching the view, as far as the mirror knows),
        `last_error`/`last_error_at`, `last_write`/`last_write_at` (path and data),
        `status_calls`, `writes`, `leader_blocked_by` (the holder whose term kept this node
        from taking `/leader`).
        """
        client_id = self._client.client_id
        with self._lock:
            out = dict(self._diag)
        out["connected"] = self._client.connected
        out["session_id"] = f"{client_id[0]:#x}" if client_id else None
        return out

    @property
    def client(self) -> KazooClient:
        """The underlying kazoo client (tests use it to find the session id)."""
        return self._client

    # --- kazoo thread -----------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        # Called on kazoo's connection thread: set flags only, never call ZooKeeper here.
        with self._lock:
            self._diag["state"] = state
            if state != KazooState.CONNECTED:
                self._diag["in_sync"] = False
        if state == KazooState.CONNECTED:
            # After SUSPENDED the session (and our znodes) may have survived or not; after
            # LOST kazoo has made a new session.  Either way: read back and repair.
            self._resync.set()
            self._wake.set()

    def _on_leader_event(self, event: Any) -> None:
        # kazoo's event thread, one-shot watch on /leader (armed while this node leads): a
        # higher-term leader replaced us, or the znode went away.  Re-check on the next tick.
        self._leader_dirty.set()
        self._wake.set()

    # --- mirror thread ----------------------------------------------------------------------

    def _run(self) -> None:
        next_full = 0.0
        while not self._stopping.is_set():
            self._wake.clear()
            view = self._poll_status()
            if view is not None and self._client.connected:
                full = self._resync.is_set() or time.monotonic() >= next_full
                self._resync.clear()
                try:
                    self._reconcile(view, full)
                except (KazooException, self._client.handler.timeout_exception) as exc:
                    if self._stopping.is_set():
                        break  # stop() closed the client under us
                    # Includes a timed-out call: it may still land later, so re-read it all.
                    self._note_error(exc)
                    self._resync.set()
                except Exception as exc:  # a bug here must not kill mirroring for good
                    log.exception("zk mirror %s: unexpected error", self.node_id)
                    self._note_error(exc)
                    self._resync.set()
                else:
                    if full:
                        next_full = time.monotonic() + self.resync_s
                    with self._lock:
                        self._diag["in_sync"] = self._leader_blocked is None
            self._wake.wait(self.interval_s)

    def _poll_status(self) -> dict | None:
        """The node's view, validated; None (and an error recorded) if unusable."""
        try:
            raw = self._status_fn()
            view = {
                "client_addr": raw["client_addr"],
                "role": raw["role"],
                "term": raw["term"],
            }
        except Exception as exc:
            self._note_error(exc, what="status_fn")
            return None
        with self._lock:
            self._diag["status_calls"] += 1
        term = view["term"]
        if (
            not isinstance(view["client_addr"], str)
            or not view["client_addr"]
            or view["role"] not in ROLES
            or not isinstance(term, int)
            or isinstance(term, bool)
            or term < 0
        ):
            self._note_error(ValueError(f"status_fn returned an unusable view {view!r}"))
            return None
        return view

    def _reconcile(self, view: dict, full: bool) -> None:
        client_id = self._client.client_id
        if client_id is None:  # disconnected since the check in _run
            return
        session = client_id[0]
        if session != self._written_session:
            # A new session owns nothing yet: the old one's ephemeral znodes are gone.
            self._written_session = session
            self._member_written = self._leader_written = None
            full = True
        if full:
            self._leader_blocked = None

        member = {
            "node_id": self.node_id,
            "client_addr": view["client_addr"],
            "role": view["role"],
            "term": view["term"],
        }
        if full or member != self._member_written:
            self._put_member(member, session)

        leader_changed = self._leader_dirty.is_set()
        self._leader_dirty.clear()
        if view["role"] == "leader":
            claim = {
                "node_id": self.node_id,
                "client_addr": view["client_addr"],
                "term": view["term"],
            }
            fresh = claim != self._leader_written and claim != self._leader_blocked
            if full or leader_changed or fresh:
                self._claim_leader(claim, session)
        else:
            self._leader_blocked = None
            with self._lock:
                self._diag["leader_blocked_by"] = None
            if full or self._leader_written is not None:
                self._release_leader(session)

    def _put_member(self, member: dict, session: int) -> None:
        data = _encode(member)
        # Read first, then write only what differs: a create that fails with NodeExists still
        # costs the ensemble a write round, and a resync every few seconds would add up.
        try:
            value, stat = self._call(self._client.get_async(self.member_path))
        except NoNodeError:
            self._call(
                self._client.create_async(self.member_path, data, ephemeral=True, makepath=True)
            )
            self._note_write(self.member_path, member)
        else:
            if stat.ephemeralOwner == session:
                if value != data:
                    self._call(
                        self._client.set_async(self.member_path, data, version=stat.version)
                    )
                    self._note_write(self.member_path, member)
            else:
                # Another session holds our name: a previous incarnation of this node that
                # crashed and whose session has not expired yet (or, if the address differs,
                # a second node configured with the same id).  The name is ours; take it.
                other = _decode(value)
                if other and other.get("client_addr") != member["client_addr"]:
                    log.warning(
                        "zk mirror %s: replacing member znode of another session %r",
                        self.node_id, other,
                    )
                self._replace(self.member_path, stat.version, data)
                self._note_write(self.member_path, member)
        self._member_written = member

    def _claim_leader(self, claim: dict, session: int) -> None:
        data = _encode(claim)
        try:
            # The watch tells us when another node replaces or removes /leader.
            value, stat = self._call(
                self._client.get_async(self.leader_path, watch=self._on_leader_event)
            )
        except NoNodeError:
            self._call(
                self._client.create_async(self.leader_path, data, ephemeral=True, makepath=True)
            )
            self._took_leader(claim, wrote=True, arm_watch=True)
            return
        if stat.ephemeralOwner == session:
            if value != data:
                # Our own claim with an older term or address; the version guards against a
                # replacement that slipped in since the read.
                self._call(self._client.set_async(self.leader_path, data, version=stat.version))
            self._took_leader(claim, wrote=value != data)
            return
        holder = _decode(value)
        holder_term = _term_of(holder)
        own_stale = holder is not None and holder.get("node_id") == self.node_id
        if holder_term < claim["term"] or (holder_term == claim["term"] and own_stale):
            self._replace(self.leader_path, stat.version, data)
            self._took_leader(claim, wrote=True, arm_watch=True)
            return
        # The holder's term is at least ours: we are the stale one (Raft will tell us soon) or
        # the holder is; only a higher term may replace it.  The watch set by the read above
        # brings us back here when the holder changes or leaves.
        self._leader_written = None
        self._leader_blocked = claim
        with self._lock:
            self._diag["leader_blocked_by"] = holder

    def _took_leader(self, claim: dict, *, wrote: bool, arm_watch: bool = False) -> None:
        if arm_watch:
            # Created just now, so the read that armed the watch (if any) saw another node.
            self._call(self._client.exists_async(self.leader_path, watch=self._on_leader_event))
        if wrote:
            self._note_write(self.leader_path, claim)
        self._leader_written = claim
        self._leader_blocked = None
        with self._lock:
            self._diag["leader_blocked_by"] = None

    def _release_leader(self, session: int) -> None:
        try:
            value, stat = self._call(self._client.get_async(self.leader_path))
        except NoNodeError:
            self._leader_written = None
            return
        holder = _decode(value)
        ours = holder is not None and holder.get("node_id") == self.node_id
        if stat.ephemeralOwner == session and ours:
            try:
                self._call(self._client.delete_async(self.leader_path, version=stat.version))
                self._note_write(self.leader_path, None)
            except (NoNodeError, BadVersionError):
                pass  # replaced or removed since the read: it is no longer ours to delete
        self._leader_written = None

    def _replace(self, path: str, version: int, data: bytes) -> None:
        """Atomically swap another session's ephemeral znode for ours.

        Raises `BadVersionError`/`NoNodeError`/`NodeExistsError` when it changed since it was
        read; the caller's tick fails and the next one re-reads.
        """
        txn = self._client.transaction()
        txn.delete(path, version=version)
        txn.create(path, data, ephemeral=True)
        results = self._call(txn.commit_async())
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, RolledBackError):
                raise result

    def _call(self, async_result: Any) -> Any:
        """Wait for one kazoo call, at most `op_timeout_s` (raises kazoo's timeout error)."""
        return async_result.get(timeout=self.op_timeout_s)

    def _note_write(self, path: str, data: dict | None) -> None:
        with self._lock:
            self._diag["last_write"] = {"path": path, "data": data}
            self._diag["last_write_at"] = time.time()
            self._diag["writes"] += 1

    def _note_error(self, exc: BaseException, what: str = "zookeeper") -> None:
        text = f"{what}: {type(exc).__name__}: {exc}"
        with self._lock:
            repeated = self._diag["last_error"] == text
            self._diag["last_error"] = text
            self._diag["last_error_at"] = time.time()
            self._diag["in_sync"] = False
        # The same error every tick during an outage would flood the log; say it once.
        level = logging.DEBUG if repeated else logging.WARNING
        log.log(level, "zk mirror %s: %s", self.node_id, text)


class LeaderWatch:
    """A client's view of `/leader` and `/members`, kept current by a kazoo `DataWatch`.

    `start()` blocks until connected and the first read is done (or raises `ZkUnavailable`).
    `.leader` never blocks; it is a `LeaderInfo` or None (no leader known).  While ZooKeeper is
    unreachable it keeps the last value seen (`connected` tells), and it catches up on
    reconnection.  `on_change(leader)` runs on kazoo's event thread, once for the first read and
    then whenever the value changes; it must return quickly, and an exception in it is logged
    and otherwise ignored.
    """

    def __init__(
        self,
        hosts: str,
        cluster: str,
        *,
        root: str = "/raftpay",
        on_change: Callable[[LeaderInfo | None], None] | None = None,
        digest: str | None = None,
        session_timeout_s: float = 4.0,
        op_timeout_s: float = 2.0,
    ):
        _check_root(root)
        _check_name("cluster", cluster)
        self.hosts = hosts
        self.cluster = cluster
        self.leader_path = leader_path(root, cluster)
        self.members_path = members_path(root, cluster)
        self.op_timeout_s = op_timeout_s
        self._on_change = on_change
        self._client = make_client(
            hosts, session_timeout_s=session_timeout_s, op_timeout_s=op_timeout_s, digest=digest
        )
        self._cond = threading.Condition()
        self._leader: LeaderInfo | None = None
        self._first_read = False
        self._stopped = False

    def start(self, timeout_s: float = 5.0) -> "LeaderWatch":
        """Connect and read `/leader` once; blocks up to `timeout_s`, raises `ZkUnavailable`."""
        deadline = time.monotonic() + timeout_s
        try:
            self._client.start(timeout=timeout_s)
        except self._client.handler.timeout_exception as exc:
            _close_client(self._client, 1.0)
            raise ZkUnavailable(f"cannot connect to ZooKeeper at {self.hosts}") from exc
        # Registering the DataWatch reads the znode synchronously (with unbounded retries); do
        # that on kazoo's thread so this call stays bounded by the deadline.
        self._client.handler.spawn(DataWatch, self._client, self.leader_path, self._on_data)
        with self._cond:
            answered = self._cond.wait_for(
                lambda: self._first_read, max(0.0, deadline - time.monotonic())
            )
        if not answered:
            self.stop(1.0)
            raise ZkUnavailable(f"no answer for {self.leader_path} within {timeout_s} s")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching and close the session.  Idempotent; blocks up to about `timeout_s`."""
        with self._cond:
            self._stopped = True
        _close_client(self._client, timeout_s)

    def __enter__(self) -> "LeaderWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def leader(self) -> LeaderInfo | None:
        with self._cond:
            return self._leader

    @property
    def connected(self) -> bool:
        return self._client.connected

    def wait_for_leader(
        self, timeout_s: float, predicate: Callable[[LeaderInfo], bool] | None = None
    ) -> LeaderInfo | None:
        """Block up to `timeout_s` until a leader (satisfying `predicate`) is known; return it,
        or None on timeout."""
        def ready() -> bool:
            return self._leader is not None and (predicate is None or predicate(self._leader))

        with self._cond:
            self._cond.wait_for(ready, timeout_s)
            return self._leader if ready() else None

    def members(self, timeout_s: float | None = None) -> list[str]:
        """Client addresses of the mirrored members, ordered by node id.  Reads ZooKeeper now:
        blocks up to `timeout_s` (default `op_timeout_s`), raises `ZkUnavailable`."""
        return [rec["client_addr"] for rec in self.member_records(timeout_s).values()]

    def member_records(self, timeout_s: float | None = None) -> dict[str, dict]:
        """node_id -> its member znode's JSON, ordered by node id (same contract as members)."""
        timeout_s = self.op_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if not self._client.connected:
            raise ZkUnavailable("not connected to ZooKeeper")
        try:
            try:
                names = self._client.get_children_async(self.members_path).get(timeout=timeout_s)
            except NoNodeError:
                return {}
            # Ask for all of them at once; one round trip's worth of waiting, not N.
            pending = {n: self._client.get_async(f"{self.members_path}/{n}") for n in sorted(names)}
            out: dict[str, dict] = {}
            for name, result in pending.items():
                try:
                    value, _ = result.get(timeout=max(0.0, deadline - time.monotonic()))
                except NoNodeError:
                    continue  # left between the listing and the read
                rec = _decode(value)
                if rec is not None and isinstance(rec.get("client_addr"), str):
                    out[name] = rec
            return out
        except (KazooException, self._client.handler.timeout_exception) as exc:
            text = f"reading {self.members_path}: {type(exc).__name__}: {exc}"
            raise ZkUnavailable(text) from exc

    # --- kazoo thread -----------------------------------------------------------------------

    def _on_data(self, data: bytes | None, stat: Any) -> bool | None:
        rec = _decode(data)
        info = None
        if rec is not None:
            try:
                info = LeaderInfo(str(rec["node_id"]), str(rec["client_addr"]), _term_of(rec))
            except KeyError:
                log.warning("leader watch: malformed %s: %r", self.leader_path, data)
        with self._cond:
            if self._stopped:
                return False  # tells DataWatch to stop calling us
            changed = info != self._leader or not self._first_read
            self._leader = info
            self._first_read = True
            self._cond.notify_all()
        if changed and self._on_change is not None:
            try:
                self._on_change(info)
            except Exception:
                log.exception("leader watch: on_change raised")
        return None


__all__ = [
    "LeaderInfo",
    "LeaderWatch",
    "ZkMirror",
    "ZkUnavailable",
    "leader_path",
    "make_client",
    "members_path",
]

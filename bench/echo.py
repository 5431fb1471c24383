"""The loopback ceiling: an empty server that speaks raftpay's client protocol and does nothing.

Design.  One process on 127.0.0.1 answers the frames raftpay's client sends (`raftpay.wire`: a
4-byte big-endian length, then a msgpack envelope `{v, type, id, body}`) on one asyncio loop,
with a plain `asyncio.Protocol` that splits frames with `wire.FrameBuffer` and answers every
frame of a read in one write.  `submit` gets code 0 and one 0 (ok) per event,
`register_session` a fresh session number, `status` a node that says it leads, `ping` and
`keep_alive` code 0, anything else `invalid_request`; so the real `AsyncClient` and `Client`
work against it unchanged, sessions included.  The harness runs its "N clients x 1 transfer/request" workloads against it with the
same load generator (`load.run_load`): what comes out is what this machine can do at all for
request/reply over loopback with this client — client, load-generator processes, asyncio,
msgpack and TCP, and a server that costs next to nothing — and raftpay's figures are reported as
a fraction of it.

What it is not: a server.  No replication, no ledger, no log, no fsync, no session table, no
schema checks: it acknowledges events it never looks at, so it is no mock for testing raftpay
and says nothing about correctness.  It only reads what it needs to answer (`type`, `id`, the
number of events).  A frame that announces more than `wire.MAX_FRAME_BYTES` closes that
connection; one that does not decode to an envelope it can answer gets `invalid_request` with
id 0, as raftpay's server does; nothing a peer sends stops the process.

    python -m bench.echo --port 7000      # by hand; the harness uses `EchoServer`
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import socket
import sys

import msgpack

from raftpay import wire
from raftpay.codes import Code

#: The row label of its results.
LABEL = "echo ceiling (no replication)"

_OK = int(Code.OK)
_OTHER = {"code": int(Code.INVALID_REQUEST),
          "message": "the echo server answers submit, register_session, keep_alive, status "
                     "and ping only"}


def _frame(rid: int, body: dict) -> bytes:
    payload = msgpack.packb({"v": wire.VERSION, "type": wire.REPLY, "id": rid, "body": body})
    return wire.PREFIX.pack(len(payload)) + payload


def answer(payload: bytes | bytearray, sessions: itertools.count) -> bytes:
    """The reply frame to one request payload (the bytes after the length prefix).  Never
    raises: what it cannot answer gets `invalid_request` with id 0."""
    try:
        env = msgpack.unpackb(payload, raw=False)
        rid, kind = env["id"], env["type"]
        if kind == "submit":
            b = env["body"]
            body = {"code": _OK, "results": [_OK] * len(b["events"] if "events" in b
                                                         else b["rows"])}
        elif kind == "register_session":
            body = {"code": _OK, "session": next(sessions)}
        elif kind == "status":
            body = {"code": _OK, "status": {"id": "echo", "mode": "echo", "role": "leader",
                                          "commit_index": 0, "applied_index": 0}}
        elif kind in ("ping", "keep_alive"):
            body = {"code": _OK}
        else:
            body = _OTHER
        return _frame(rid, body)
    except Exception as e:  # garbage in any shape; the contract is an answer, not a crash
        return _frame(0, {"code": int(Code.INVALID_REQUEST),
                          "message": f"echo: cannot answer this frame ({type(e).__name__})"})


class _Echo(asyncio.Protocol):
    """One connection: frames in (`wire.FrameBuffer`, as raftpay's server splits them), replies
    out in order, one write per read."""

    def __init__(self, sessions: itertools.count):
        self.sessions = sessions
        self.frames = wire.FrameBuffer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        payloads = self.frames.feed(data)
        if payloads:
            self.transport.write(b"".join([answer(p, self.sessions) for p in payloads]))
        if self.frames.error is not None:  # announced more than the limit: out of step
            self.transport.close()


def serve(sock: socket.socket) -> None:
    """Serve on a bound, listening socket until the process is stopped (blocks)."""
    async def main() -> None:
        sessions = itertools.count(1)
        server = await asyncio.get_running_loop().create_server(
            lambda: _Echo(sessions), sock=sock, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class EchoServer:
    """The echo server in a process of its own on a free loopback port.  A context manager;
    `addr` is "127.0.0.1:port" (for a client's seeds) and `pid` the process id."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._sock = socket.socket()
        self._sock.bind((host, port))
        self._sock.listen(1024)  # connections queue until the child accepts: no ready wait
        self.addr = "%s:%d" % self._sock.getsockname()[:2]
        self._proc = mp.get_context("fork").Process(target=serve, args=(self._sock,),
                                                     name="bench-echo", daemon=True)
        self._proc.start()
        self._sock.close()
        self.pid: int = self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> "EchoServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    s = socket.socket()
    s.bind((args.host, args.port))
    s.listen(1024)
    print("echo server listening on %s:%d" % s.getsockname()[:2], file=sys.stderr, flush=True)
    try:
        serve(s)
    except KeyboardInterrupt:
        pass

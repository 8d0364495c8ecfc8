"""A node's warm worker: one long-lived process per SuperNode that keeps the client's runtime (the NanoEdge, its image
features, the split channel) between messages, behind the thin ClientApp.

Flower 1.41's SuperNode starts a fresh `flwr-clientapp` process for every message (its warm executors serve other task
kinds, not ClientApps), so without a worker every message would start Python, import torch and load the NanoEdge again
(BENCHMARKS.md, "A deployed round at real size"). The ClientApp (client_app.py) imports only this module, Flower and the
record keys: it hands the message's content to the worker over a Unix socket, starting the worker on the node's first
message, and returns the worker's reply. The worker runs client_work.py, the same code a ClientApp runs in-process.

- One worker per SuperNode, Python and FedNano code: the socket's name hashes the SuperNode's runtime process (the
  ClientApp's parent), the interpreter and the code's folder, so a restarted SuperNode or another app version gets a
  worker of its own.
- The socket lives in a folder only this user may open (0700, checked) and the worker serves only peers of its own uid
  (SO_PEERCRED).
- The worker exits when the SuperNode's runtime process does (checked every second between messages), after node config
  `worker-idle` seconds without a message (default 1800), or on SIGTERM.
- Its log: `node-worker.log` in the node's `state-dir`, else beside its socket. An error in a message's work fails that
  message with the worker's error text; a worker that dies mid-message fails the message, naming its log.
- Node config `warm-worker=0` runs each message in the ClientApp's own process instead. That is the default outside a
  `flwr-clientapp` process (the simulation's Ray actors are long-lived already, and tests call the handlers directly).

Run by hand: python -m fednano.federation.node_worker --socket PATH --parent PID [--idle SECONDS] [--log FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fednano.errors import ConfigError, UserError
from fednano.federation import keys
from fednano.proc import process_age

log = logging.getLogger("fednano.node_worker")

IDLE_SECONDS = 1800.0  # node config worker-idle's default
START_SECONDS = 120.0  # how long a ClientApp waits for a worker it started to answer
_FRAME = struct.Struct("!Q")
_MAX_HEADER = 1 << 20


class WorkerError(UserError, RuntimeError):
    """The node's warm worker could not be reached or failed a message; the text names the node, and the log."""


@dataclass(frozen=True)
class Node:
    """Who a message reached and when: what a handler needs of Flower's Context, in plain values (so a worker gets it too)."""

    id: int
    config: dict[str, Any]
    arrived: float  # time.time() when the ClientApp got the message
    start: float | None  # the ClientApp process's age then: a fresh process's start-up (None where /proc cannot say)
    relayed: float | None = None  # time.time() when a warm worker took the message over (None: the ClientApp's own process)

    @classmethod
    def of(cls, context: Context) -> Node:
        return cls(int(context.node_id), dict(context.node_config), time.time(), process_age())

    @property
    def name(self) -> str:
        return f"node {self.id}"


# ------------------------------------------------------------------ the wire: a JSON header and a RecordDict, length-prefixed
def _send(sock: socket.socket, header: dict[str, Any], body: bytes) -> None:
    head = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(head)) + head + _FRAME.pack(len(body)))
    sock.sendall(body)


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"the peer closed the socket after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    (n,) = _FRAME.unpack(_exact(sock, _FRAME.size))
    if n > _MAX_HEADER:
        raise ValueError(f"a header of {n} bytes (at most {_MAX_HEADER})")
    header = json.loads(_exact(sock, n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    (m,) = _FRAME.unpack(_exact(sock, _FRAME.size))
    return header, _exact(sock, m)


def encode(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode(body: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(body))


# ------------------------------------------------------------------ the ClientApp's side
def wanted(node: Node) -> bool:
    """Whether this message goes to the node's warm worker: node config warm-worker, by default on in a `flwr-clientapp`
    process (a SuperNode's single-use ClientApp process) and off elsewhere."""
    value = node.config.get(keys.WARM_WORKER, Path(sys.argv[0]).name == "flwr-clientapp")
    flag = str(value).strip().lower()
    if flag not in ("0", "1", "false", "true", "no", "yes"):
        raise ConfigError(f"{node.name}: node config {keys.WARM_WORKER}={value!r} must be 0 or 1")
    return flag in ("1", "true", "yes")


def _private_dir() -> Path:
    """The folder of this user's worker sockets: made 0700, and refused if anyone else could enter it."""
    d = Path(tempfile.gettempdir()) / f"fednano-workers-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerError(f"{d} (the node workers' sockets) must belong to uid {os.getuid()} with mode 0700; "
                          f"it has uid {st.st_uid}, mode {st.st_mode & 0o777:o}: remove it")
    return d


@dataclass(frozen=True)
class Place:
    """Where one SuperNode's worker listens and logs, and the process it outlives not."""

    path: Path  # the Unix socket
    log: Path
    parent: int
    idle: float
    code: str  # the folder FedNano's code was loaded from (Flower's installed app): the worker imports the same

    @classmethod
    def of(cls, node: Node) -> Place:
        import fednano

        code = str(Path(fednano.__file__).resolve().parent.parent)
        parent = os.getppid()  # the SuperNode's runtime process (flower-superexec), which starts every ClientApp process
        key = hashlib.sha256(json.dumps([parent, sys.executable, code, fednano.__version__]).encode()).hexdigest()[:16]
        folder = _private_dir()
        state = node.config.get(keys.STATE_DIR)
        logfile = Path(str(state)) / "node-worker.log" if state else folder / f"{key}.log"
        try:
            idle = keys.number(node.config.get(keys.WORKER_IDLE, IDLE_SECONDS))
        except TypeError as e:
            raise ConfigError(f"{node.name}: node config {keys.WORKER_IDLE}: {e}") from None
        if idle <= 0:
            raise ConfigError(f"{node.name}: node config {keys.WORKER_IDLE}={idle:g} must be > 0 (seconds)")
        return cls(folder / f"{key}.sock", logfile, parent, idle, code)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
        except OSError:
            s.close()
            raise
        return s

    def reach(self, node: Node) -> socket.socket:
        """A connection to the worker, which this call starts when none answers (one start at a time: a lock file)."""
        try:
            return self.connect()
        except OSError:
            pass
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # another ClientApp of this node may have started it meanwhile
                return self.connect()
            except OSError:
                return self._start(node)

    def _start(self, node: Node) -> socket.socket:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (self.code, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "fednano.federation.node_worker", "--socket", str(self.path), "--parent", str(self.parent),
               "--idle", f"{self.idle:g}", "--log", str(self.log)]
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # not in the ClientApp's process group: it outlives the message
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                return self.connect()
            except OSError:
                pass
            code_ = proc.poll()
            if code_ is not None:
                raise WorkerError(f"{node.name}: its warm worker exited at start (code {code_}); its log {self.log} ends:\n"
                                  + _tail(self.log))
            if time.monotonic() > deadline:
                raise WorkerError(f"{node.name}: its warm worker (pid {proc.pid}) did not answer within {START_SECONDS:g} s; "
                                  f"its log: {self.log}")
            time.sleep(0.05)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(unreadable)"


def relay(kind: str, content: RecordDict, node: Node) -> RecordDict:
    """The worker's reply to one message (kind: "train" or "evaluate"), or its error raised here, naming the node."""
    place = Place.of(node)
    body = encode(content)
    header = {"kind": kind, "node_id": node.id, "node_config": node.config, "arrived": node.arrived, "start": node.start}
    try:
        with place.reach(node) as sock:
            _send(sock, header, body)
            reply, out = _recv(sock)
    except (OSError, EOFError, ValueError) as e:
        raise WorkerError(f"{node.name}: its warm worker stopped during the {kind} message ({e}); its log: {place.log}") from None
    if not reply.get("ok"):
        raise WorkerError(f"{node.name}: {reply.get('error', 'the warm worker failed the message')}")
    return decode(out)


# ------------------------------------------------------------------ the worker's side
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def _peer_uid(conn: socket.socket) -> int:
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


def _serve_one(conn: socket.socket, work: Any) -> None:
    if _peer_uid(conn) != os.getuid():
        log.warning("refused a connection from uid %d", _peer_uid(conn))
        return
    try:
        header, body = _recv(conn)
        kind = str(header["kind"])
        handler = work.HANDLERS[kind]
        took = time.time()
        node = Node(int(header["node_id"]), dict(header["node_config"]), float(header["arrived"]), header.get("start"), took)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        log.warning("a malformed request: %s", e)
        return
    built = work.runtimes_built()
    try:
        out = handler(decode(body), node)
        reply: tuple[dict[str, Any], bytes] = ({"ok": True}, encode(out))
        log.info("%s: %s message served in %.1f s%s", node.name, kind, time.time() - took,
                 " (built the client runtime)" if work.runtimes_built() > built else "")
    except Exception as e:  # the message fails, the worker goes on (as a fresh ClientApp process would for the next one)
        (log.warning if isinstance(e, UserError) else log.exception)("%s: %s message failed: %s", node.name, kind, e)
        reply = ({"ok": False, "error": f"{type(e).__name__}: {e}"}, b"")
    try:
        _send(conn, *reply)
    except OSError as e:
        log.warning("%s: the ClientApp left before the reply (%s)", node.name, e)


def serve(path: Path, parent: int, idle: float) -> None:
    """Listen on `path` until `parent` is gone or `idle` seconds pass without a message."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the socket is removed and the channels closed
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)  # a dead worker's socket
    old = os.umask(0o177)
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    srv.listen(16)
    srv.settimeout(1.0)
    log.info("worker pid %d listening on %s for the SuperNode runtime pid %d (idle limit %g s)", os.getpid(), path, parent, idle)
    from fednano.federation import client_work  # the heavy part (torch, the NanoEdge's code), once the socket answers

    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                if not _alive(parent):
                    log.info("the SuperNode runtime pid %d is gone: exiting", parent)
                    return
                if time.monotonic() - last > idle:
                    log.info("no message for %g s: exiting", idle)
                    return
                continue
            with conn:
                conn.settimeout(None)
                _serve_one(conn, client_work)
            last = time.monotonic()
    finally:
        srv.close()
        path.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)
        client_work.close_runtimes()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fednano.federation.node_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    ap.add_argument("--parent", type=int, required=True, help="exit when this process is gone (the SuperNode's runtime)")
    ap.add_argument("--idle", type=float, default=IDLE_SECONDS, help="exit after this many seconds without a message")
    ap.add_argument("--log", type=Path, default=None, help="(the log file, named here so that operators find it; "
                                                            "the ClientApp sends stdout and stderr to it)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    serve(a.socket, a.parent, a.idle)


if __name__ == "__main__":
    main()

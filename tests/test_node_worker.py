"""The warm node worker behind the thin ClientApp (fednano/federation/node_worker.py): a SuperNode's messages are
served by one long-lived process that builds the client runtime once, replies as the ClientApp's own process would,
fails one message without dying, is replaced when it dies, and exits with its SuperNode."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr", reason="the federation layer needs Flower (absent on the GPU machine: benchmarks/gpu_checks.py)")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fednano.errors import ConfigError
from fednano.federation import client_app, keys, node_worker
from fednano.federation.node_worker import Node, WorkerError
from tests.conftest import ROOT


def test_the_client_app_process_loads_neither_torch_nor_the_nanoedge():
    """What a fresh ClientApp process imports before it relays a message: Flower, the keys, the relay; no torch."""
    heavy = ("torch", "transformers", "fednano.federation.client_work", "fednano.runtime.client", "fednano.client.nanoedge")
    code = f"import sys, fednano.federation.client_app; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_warm_worker_is_a_node_setting_checked_by_name():
    node = Node(4, {keys.WARM_WORKER: "maybe"}, 0.0, None)
    with pytest.raises(ConfigError, match="node 4: node config warm-worker='maybe' must be 0 or 1"):
        node_worker.wanted(node)
    assert node_worker.wanted(Node(4, {keys.WARM_WORKER: 1}, 0.0, None))
    assert not node_worker.wanted(Node(4, {}, 0.0, None))  # outside flwr-clientapp: the ClientApp's own process
    with pytest.raises(ConfigError, match="node 4: node config worker-idle=0 must be > 0"):
        node_worker.Place.of(Node(4, {keys.WORKER_IDLE: 0}, 0.0, None))


def _train_message(cfg, address, digest, rnd, state):
    conf = ConfigRecord({keys.RUN_CONFIG: cfg.to_json(), keys.SPLIT_ADDRESS: address, keys.SERVER_ROUND: rnd,
                         keys.BUNDLE_DIGEST: digest})
    return Message(RecordDict({keys.CONFIG: conf, keys.ARRAYS: ArrayRecord(state)}), dst_node_id=9, message_type="train")


def _gone(pid, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(ChildProcessError):  # (a worker this process started is its child here: reap it)
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_warm_worker_serves_a_nodes_messages_and_exits_with_its_supernode(tiny_cfg, tiny_bundle, tiny_llm, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fednano.backbones.bundle import load_nanoedge
    from fednano.backbones.digest import digest
    from fednano.federation import client_work
    from fednano.split.server import SplitServer

    for attr in ("_task_id", "_run_id", "_node_id"):  # who makes the message, as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    supernode = subprocess.Popen(["sleep", "600"])  # stands for the SuperNode's runtime process: the worker's parent
    monkeypatch.setattr(node_worker.os, "getppid", lambda: supernode.pid)
    state_dir = tmp_path / "state"
    node = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 2, keys.STATE_DIR: str(state_dir)}
    warm, local = Context(0, 9, {**node, keys.WARM_WORKER: 1}, RecordDict(), {}), Context(0, 9, node, RecordDict(), {})
    start = load_nanoedge(tiny_bundle / "client", tiny_cfg.adapter).edge.adapter_state()
    log = state_dir / "node-worker.log"
    try:
        with SplitServer(tiny_llm) as server:
            msg = [_train_message(tiny_cfg, server.address, digest(tiny_bundle / "client"), r, start) for r in (1, 2, 3)]
            first, second = client_app.train(msg[0], warm), client_app.train(msg[1], warm)
            # the same work as in the ClientApp's own process: the same update, bit for bit
            own = client_app.train(msg[0], local)
            for k, v in own.content.array_records[keys.ARRAYS].to_torch_state_dict().items():
                assert first.content.array_records[keys.ARRAYS].to_torch_state_dict()[k].equal(v), k
            for reply in (first, second):
                m = reply.content.metric_records[keys.METRICS]
                assert m[keys.NUM_EXAMPLES] > 0 and m["activations_up"] > 0 and m[keys.PHASE_PREFIX + "relay"] >= 0
            text = log.read_text()
            assert text.count("node 9: train message served") == 2 and text.count("(built the client runtime)") == 1, text
            (pid,) = map(int, re.findall(r"worker pid (\d+) listening", text))

            # a message's error fails that message, named, and the worker goes on
            bad = Context(0, 9, {**node, keys.PARTITION_ID: 7, keys.WARM_WORKER: 1}, RecordDict(), {})
            with pytest.raises(WorkerError, match=r"node 9: ConfigError: node 9: node config partition-id=7 is not one of 0..1"):
                client_app.train(msg[2], bad)
            assert not _gone(pid, 0.5)

            # a worker that died is replaced on the next message (its socket is left behind)
            os.kill(pid, signal.SIGKILL)
            assert _gone(pid, 10)
            third = client_app.train(msg[2], warm)
            assert third.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] > 0
            pids = [int(p) for p in re.findall(r"worker pid (\d+) listening", log.read_text())]
            assert len(pids) == 2 and pids[0] == pid
        # its SuperNode gone, the worker exits and removes its socket
        supernode.kill()
        supernode.wait()
        assert _gone(pids[1], 15), log.read_text()[-2000:]
        assert "is gone: exiting" in log.read_text()
        assert not list(node_worker._private_dir().glob(f"{node_worker.Place.of(Node(9, node, 0.0, None)).path.name}"))
    finally:
        supernode.kill()
        for p in re.findall(r"worker pid (\d+) listening", log.read_text() if log.exists() else ""):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p), signal.SIGKILL)
        client_work.close_runtimes()


def test_a_worker_that_dies_mid_message_fails_it_naming_its_log(tmp_path, monkeypatch):
    """A socket that answers and then closes (a worker killed during the work) fails the message in one line."""
    import socket
    import threading

    supernode = subprocess.Popen(["sleep", "600"])
    monkeypatch.setattr(node_worker.os, "getppid", lambda: supernode.pid)
    node = Node(5, {keys.STATE_DIR: str(tmp_path)}, time.time(), None)
    place = node_worker.Place.of(node)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(place.path))
    srv.listen(1)

    def die_mid_message():
        conn, _ = srv.accept()
        node_worker._recv(conn)
        conn.close()

    t = threading.Thread(target=die_mid_message)
    t.start()
    try:
        died = rf"node 5: its warm worker stopped during the train message .*its log: {tmp_path}/node-worker.log"
        with pytest.raises(WorkerError, match=died):
            node_worker.relay("train", RecordDict({keys.CONFIG: ConfigRecord({"x": json.dumps(1)})}), node)
    finally:
        t.join(5)
        srv.close()
        place.path.unlink(missing_ok=True)
        supernode.kill()

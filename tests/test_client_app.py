"""The ClientApp's handling of one message: the node's own settings over the server's run config."""

import json

import pytest
import torch

pytest.importorskip("flwr", reason="the federation layer needs Flower (absent on the GPU machine: benchmarks/gpu_checks.py)")

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fednano.federation import client_work, keys
from fednano.federation.node_worker import Node


def test_a_nodes_own_batch_size_and_threads_reach_its_work(tiny_cfg, tiny_bundle, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # who makes the message, as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    msg = _message(tiny_cfg)
    threads = torch.get_num_threads()
    try:
        small = Context(0, 7, {keys.PARTITION_ID: 1, "num-partitions": 2, "batch-size": 1, "threads": 1, "device": "cpu"}, RecordDict(), {})
        _, job = client_work._job(msg.content, Node.of(small))
        assert (job.cfg.train.batch_size, job.cfg.federation.client_cpus, job.partition) == (1, 1.0, 1)
        assert torch.get_num_threads() == 1 and job.rt.device.type == "cpu"
        assert job.cfg.train.local_steps == tiny_cfg.train.local_steps  # the rest is the server's
        plain = Context(0, 8, {keys.PARTITION_ID: 0, "num-partitions": 2}, RecordDict(), {})
        _, other = client_work._job(msg.content, Node.of(plain))
        assert other.cfg.train.batch_size == tiny_cfg.train.batch_size and other.rt is not job.rt
        assert json.loads(other.rt.cfg.to_json()) == json.loads(tiny_cfg.to_json())
    finally:
        torch.set_num_threads(threads)
        client_work.close_runtimes()


def _message(cfg, digest=None):
    """A train message as the ServerApp sends it: the run config, the split server's address, the client bundle's digest."""
    from fednano.backbones.digest import digest as bundle_digest
    from fednano.backbones.prepare import bundle_dir

    digest = digest if digest is not None else bundle_digest(bundle_dir(cfg) / "client")
    conf = ConfigRecord({keys.RUN_CONFIG: cfg.to_json(), keys.SPLIT_ADDRESS: "127.0.0.1:1", keys.SERVER_ROUND: 1,
                         keys.BUNDLE_DIGEST: digest})
    return Message(RecordDict({keys.CONFIG: conf}), dst_node_id=7, message_type="train")


def _close_runtimes():
    client_work.close_runtimes()


def test_a_node_brings_its_own_data_and_a_bad_one_is_named(tiny_cfg, tiny_bundle, tmp_path, monkeypatch):
    """data.on_nodes: each node trains on all of its own folder (here LLaVA JSON, 30 and 20 conversations),
    keeps its own test split, and the server's config holds no client data; a node without data, or with
    malformed data, fails its message with an error naming the node (and the file)."""
    import dataclasses

    import pytest
    from flwr.supercore.task_identity import TaskIdentity

    from fednano.data.samples import DataError
    from tests.datasets import make_llava_json

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, on_nodes=True))
    a, b = make_llava_json(tmp_path / "site-a", n=30), make_llava_json(tmp_path / "site-b", n=20)
    try:
        jobs = {}
        for node, path in ((11, a), (12, b)):
            ctx = Context(0, node, {keys.PARTITION_ID: node - 11, "dataset": "llava-json", "data-path": str(path)}, RecordDict(), {})
            _, jobs[node] = client_work._job(_message(cfg).content, Node.of(ctx))
        for node, n, root in ((11, 30, "site-a"), (12, 20, "site-b")):
            data = jobs[node].data
            assert len(data.train) + len(data.test) == n  # all of its own data: nothing partitioned away
            assert all(root in p for s in data.train + data.test for p in s.images)
            assert jobs[node].rt.task.name == "llava-json" and jobs[node].rt.task.candidate_sets == {"answers": ["no", "yes"]}
        server = make_llava_json(tmp_path / "server", n=20)  # the server's own (test) data: never a node's
        on_server = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="llava-json", path=str(server)))
        with pytest.raises(DataError, match="node 13: data.on_nodes is set, but its node config names no data-path"):
            client_work._job(_message(on_server).content, Node.of(Context(0, 13, {keys.PARTITION_ID: 2}, RecordDict(), {})))
        (tmp_path / "site-c").mkdir()
        (tmp_path / "site-c" / "data.json").write_text("[{broken")
        bad = Context(0, 14, {keys.PARTITION_ID: 3, "dataset": "llava-json", "data-path": str(tmp_path / "site-c" / "data.json")},
                      RecordDict(), {})
        with pytest.raises(DataError, match=r"node 14: .*site-c/data.json: not valid JSON"):
            client_work._job(_message(cfg).content, Node.of(bad))
    finally:
        _close_runtimes()


NODE_READS = """
import json, sys
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_task_id", "_run_id", "_node_id"):
    setattr(TaskIdentity, attr, 1)
from fednano.config import from_dict
from fednano.federation import client_work, keys
from fednano.federation.node_worker import Node
from tests.test_client_app import _message
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and isinstance(args[0], str) else None)
cfg = from_dict(json.loads(sys.argv[1]))
ctx = Context(0, 11, {keys.PARTITION_ID: 0, "dataset": "llava-json", "data-path": sys.argv[2]}, RecordDict(), {})
_, job = client_work._job(_message(cfg).content, Node.of(ctx))
job.rt.work.images(job.data.train[:4])  # and its images are encoded
print(json.dumps(opened))
"""


def test_a_node_reads_no_other_nodes_folder(tiny_cfg, tiny_bundle, tmp_path):
    """Audited in a fresh process: every file a node's ClientApp opens while it builds its job (bundle, data,
    images) — none of another node's folder, every one of its own data's files it uses."""
    import dataclasses
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.datasets import make_llava_json

    a, b = make_llava_json(tmp_path / "site-a", n=30), make_llava_json(tmp_path / "site-b", n=20)
    # the run config names site-b's data (as the server's own): node A must still read only its own
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, on_nodes=True, dataset="llava-json", path=str(b)))
    proc = subprocess.run([sys.executable, "-c", NODE_READS, cfg.to_json(), str(a)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "FEDNANO_PROGRESS": "off"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    opened = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [p for p in opened if "site-b" in p]
    assert str(a) in opened and any("site-a/images/" in p for p in opened)

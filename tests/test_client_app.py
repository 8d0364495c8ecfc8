"""The ClientApp's handling of one message: the node's own settings over the server's run config."""

import json

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fednano.federation import client_app, keys


def test_a_nodes_own_batch_size_and_threads_reach_its_work(tiny_cfg, tiny_bundle, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # who makes the message, as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, attr, 1)
    conf = ConfigRecord({keys.RUN_CONFIG: tiny_cfg.to_json(), keys.SPLIT_ADDRESS: "127.0.0.1:1", keys.SERVER_ROUND: 1})
    msg = Message(RecordDict({keys.CONFIG: conf}), dst_node_id=7, message_type="train")
    threads = torch.get_num_threads()
    try:
        small = Context(0, 7, {keys.PARTITION_ID: 1, "num-partitions": 2, "batch-size": 1, "threads": 1, "device": "cpu"}, RecordDict(), {})
        _, job = client_app._job(msg, small)
        assert (job.cfg.train.batch_size, job.cfg.federation.client_cpus, job.partition) == (1, 1.0, 1)
        assert torch.get_num_threads() == 1 and job.rt.device.type == "cpu"
        assert job.cfg.train.local_steps == tiny_cfg.train.local_steps  # the rest is the server's
        plain = Context(0, 8, {keys.PARTITION_ID: 0, "num-partitions": 2}, RecordDict(), {})
        _, other = client_app._job(msg, plain)
        assert other.cfg.train.batch_size == tiny_cfg.train.batch_size and other.rt is not job.rt
        assert json.loads(other.rt.cfg.to_json()) == json.loads(tiny_cfg.to_json())
    finally:
        torch.set_num_threads(threads)
        for rt in client_app._RUNTIMES.values():
            rt.split.close()
        client_app._RUNTIMES.clear()

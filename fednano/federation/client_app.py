"""The ClientApp: unpack a message, run NanoEdge work through the split channel, pack the reply.

Everything a client needs arrives in the message (adapters, the run config,
the split server's address, token and CA); the client's own state (NanoEdge,
image features, its data partition, the channel) is cached per process: across
rounds in the simulation's Ray actors; under a SuperNode every message starts a
fresh ClientApp process, so it is rebuilt per message there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fednano.config import RunConfig, from_dict
from fednano.data import load_task
from fednano.data.partition import ClientData, split_clients
from fednano.federation import keys
from fednano.fisher import empirical_fisher
from fednano.models.bundle import load_nanoedge
from fednano.models.nanoedge import NanoEdge
from fednano.prepare import bundle_dir
from fednano.split.client import SplitClient
from fednano.training import ImageFeatures, Workload, evaluate, train_local


@dataclass
class ClientRuntime:
    cfg: RunConfig
    edge: NanoEdge
    work: Workload
    split: SplitClient


@lru_cache(maxsize=4)
def _runtime(config_json: str, address: str, token: str, ca: str) -> ClientRuntime:
    cfg = from_dict(json.loads(config_json), "run-config")
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    bundle = load_nanoedge(bundle_dir(cfg) / "client", cfg.adapter)  # client/ only: no LLM weights
    work = Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens, load_task(cfg).system)
    split = SplitClient(address, cfg.split.wire_dtype, cfg.split.max_frame_mb, cfg.federation.round_timeout,
                        token=token or None, root_certificates=ca.encode() if ca else None)
    return ClientRuntime(cfg, bundle.edge, work, split)


_PARTS: dict[str, list[ClientData]] = {}


def partitions(cfg: RunConfig) -> list[ClientData]:
    """Every client's data, computed identically by every process from the config."""
    key = json.dumps([cfg.data.to_key(), cfg.prepare.caption_images, cfg.prepare.seed])
    if key not in _PARTS:
        _PARTS[key] = split_clients(load_task(cfg).train, cfg.data)
    return _PARTS[key]


def client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    parts = partitions(cfg)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} out of range for {len(parts)} clients")
    return parts[partition_id]


def _setup(msg: Message, context: Context) -> tuple[ClientRuntime, ClientData, int, int]:
    conf = msg.content[keys.CONFIG]
    rt = _runtime(str(conf[keys.RUN_CONFIG]), str(conf[keys.SPLIT_ADDRESS]), str(conf.get(keys.SPLIT_TOKEN, "")), str(conf.get(keys.SPLIT_CA, "")))
    pid = int(context.node_config[keys.PARTITION_ID])
    rt.edge.load_adapter_state(msg.content[keys.ARRAYS].to_torch_state_dict())
    return rt, client_data(rt.cfg, pid), pid, int(conf[keys.SERVER_ROUND])


def _traffic_delta(rt: ClientRuntime, before: dict[str, int]) -> dict[str, float]:
    after = rt.split.traffic()
    return {k: float(after[k] - before[k]) for k in keys.BYTES_KEYS}


app = ClientApp()


def _fault_injection(pid: int, rnd: int) -> None:
    """FEDNANO_FAULT="exit:<partition>:<round>" or "hang:<partition>:<round>" makes that client
    die (hard exit) or hang mid-round: how the tests exercise the server's fault tolerance."""
    spec = os.environ.get("FEDNANO_FAULT", "")
    if not spec:
        return
    kind, part, when = spec.split(":")
    if int(part) == pid and int(when) == rnd:
        if kind == "exit":
            os._exit(17)
        time.sleep(10**6)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    rt, data, pid, rnd = _setup(msg, context)
    _fault_injection(pid, rnd)
    before = rt.split.traffic()
    gen = torch.Generator().manual_seed(rt.cfg.federation.seed * 1_000_003 + rnd * 1009 + pid)
    conf = msg.content[keys.CONFIG]
    fisher_mode, mu = str(conf[keys.WANT_FISHER]), float(conf.get(keys.PROXIMAL_MU, 0.0))
    anchor = rt.edge.adapter_state() if mu > 0 else None  # the global adapters this round started from
    stats = train_local(rt.edge, rt.split, data.train, rt.work, rt.cfg.train, gen, proximal_mu=mu, anchor=anchor,
                        accumulate_fisher=fisher_mode == "training")
    content = RecordDict({keys.ARRAYS: ArrayRecord(rt.edge.adapter_state())})
    if fisher_mode == "training":
        content[keys.FISHER] = ArrayRecord(stats.pop("fisher"))
    elif fisher_mode == "pass":
        n = min(rt.cfg.train.fisher_samples, len(data.train))
        pick = torch.randperm(len(data.train), generator=gen)[:n].tolist()
        subset = [data.train[i] for i in pick]
        chunks = (rt.work.train_batch(subset[i : i + rt.cfg.train.batch_size]) for i in range(0, n, rt.cfg.train.batch_size))
        fisher, _ = empirical_fisher(rt.edge, rt.split, chunks)
        content[keys.FISHER] = ArrayRecord(fisher)
    content[keys.METRICS] = MetricRecord({
        keys.NUM_EXAMPLES: len(data.train), keys.PARTITION_ID: pid, keys.TRAIN_LOSS: stats["train_loss"],
        keys.SECONDS: time.time() - t0, **_traffic_delta(rt, before),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the global adapters on this client's local test split."""
    rt, data, pid, _ = _setup(msg, context)
    before = rt.split.traffic()
    task = load_task(rt.cfg)
    res = evaluate(rt.edge, rt.split, data.test, rt.work, task.candidate_sets, rt.cfg.train.eval_batch_size, task.categories)
    res.pop("num_examples")
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(data.test), keys.PARTITION_ID: pid, **res, **_traffic_delta(rt, before)})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)



"""The ClientApp: unpack a message, let the method do the client's work, pack the reply.

Everything a client needs arrives in the message (the global state, the run config, the split
server's address, token and CA); what it keeps is cached per process (`ClientRuntime`: the
NanoEdge, image features, the split channel): across rounds in the simulation's Ray actors;
under a SuperNode every message starts a fresh ClientApp process, so it is rebuilt per message.
Which method runs, and so what the client computes, is the run config's registry entry.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fednano.config import ConfigError, RunConfig, from_dict, with_node_settings
from fednano.data.partition import client_data, node_data
from fednano.data.samples import DataError
from fednano.devices import describe, peak_host_memory, peak_memory, process_age, reset_peak_memory
from fednano.errors import UserError
from fednano.federation import keys
from fednano.methods.registry import Method, method_of
from fednano.runtime.client import ClientJob, ClientRuntime

_RUNTIMES: dict[tuple[str, str, str, str, str, bool], ClientRuntime] = {}  # what this process holds, per run and node


def _runtime(config_json: str, address: str, token: str, ca: str, digest: str, fetch: bool) -> ClientRuntime:
    key = (config_json, address, token, ca, digest, fetch)
    if key not in _RUNTIMES:
        while len(_RUNTIMES) >= 4:  # a simulation actor serves several nodes; keep the last few
            _RUNTIMES.pop(next(iter(_RUNTIMES))).split.close()
        _RUNTIMES[key] = ClientRuntime.build(from_dict(json.loads(config_json), "run-config"), address, token, ca, digest, fetch)
    return _RUNTIMES[key]


def _identity(node_config: dict, cfg: RunConfig, node: str) -> int:
    """The node's partition-id, checked against the run: num-partitions (when the node sets it) must be
    data.num_clients, and without data.on_nodes the partition must exist."""
    if keys.PARTITION_ID not in node_config:
        raise ConfigError(f"{node}: its node config has no partition-id (flower-supernode --node-config \"partition-id=0 ...\")")
    try:
        pid = keys.number(node_config[keys.PARTITION_ID])
        total = keys.number(node_config.get(keys.NUM_PARTITIONS, cfg.data.num_clients))
    except TypeError as e:
        raise ConfigError(f"{node}: node config partition-id / num-partitions: {e}") from None
    if total != cfg.data.num_clients:
        raise ConfigError(f"{node}: node config num-partitions={total:g}, but the run has data.num_clients={cfg.data.num_clients}")
    if pid != int(pid) or pid < 0 or (not cfg.data.on_nodes and pid >= cfg.data.num_clients):
        raise ConfigError(f"{node}: node config partition-id={pid:g} is not one of 0..{cfg.data.num_clients - 1} (data.num_clients)")
    return int(pid)


def _job(msg: Message, context: Context) -> tuple[Method, ClientJob]:
    arrived = time.time()
    conf = msg.content.config_records[keys.CONFIG]
    node, node_config = f"node {context.node_id}", dict(context.node_config)
    # the server's run config, with what this node sets for itself (batch size, device, threads, its own data)
    cfg = with_node_settings(from_dict(json.loads(str(conf[keys.RUN_CONFIG])), "run-config"), node_config, node)
    if cfg.data.on_nodes and keys.DATA_PATH not in node_config:  # never the packaged data (nor the run's) in its place
        raise DataError(f"{node}: data.on_nodes is set, but its node config names no data-path (the node's own data)")
    pid = _identity(node_config, cfg, node)
    # where this message's time goes: a fresh process's start (interpreter, imports, Flower loading the app)
    seconds = {"start": process_age() or 0.0} if not _RUNTIMES else {}
    try:  # the node's data (its own, or its partition of the simulation's) is read and checked here
        t = time.time()
        fetch = str(node_config.get(keys.FETCH_BUNDLE, 1)).lower() not in ("0", "false", "no")
        rt = _runtime(cfg.to_json(), str(conf[keys.SPLIT_ADDRESS]), str(conf.get(keys.SPLIT_TOKEN, "")), str(conf.get(keys.SPLIT_CA, "")),
                      str(conf.get(keys.BUNDLE_DIGEST, "")), fetch)
        seconds["build"], t = time.time() - t, time.time()
        data = node_data(rt.cfg) if cfg.data.on_nodes else client_data(rt.cfg, pid)
        seconds["data"] = time.time() - t
    except UserError as e:
        raise type(e)(f"{node}: {e}") from None
    # what never leaves the client lives on its own disk: the SuperNode's state-dir, or in simulation the run's folder
    root = node_config.get(keys.STATE_DIR) or conf.get(keys.CLIENT_STATE_DIR, "")
    reset_peak_memory(rt.device)  # the peak reported is this message's work
    job = ClientJob(rt, data, pid, int(keys.number(conf[keys.SERVER_ROUND])), Path(str(root)) if root else None)
    job.seconds, job.arrived = seconds, arrived
    return method_of(rt.cfg), job


def _phases(job: ClientJob) -> dict[str, float]:
    """The message's time by phase (keys.PHASE_PREFIX + start, build, data, work)."""
    job.seconds["work"] = time.time() - job.arrived - sum(v for k, v in job.seconds.items() if k != "start")
    return {keys.PHASE_PREFIX + k: round(v, 3) for k, v in job.seconds.items()}


def _traffic_delta(job: ClientJob, before: dict[str, int]) -> dict[str, float]:
    after = job.rt.traffic()
    moved = {k: float(after[k] - before[k]) for k in after}
    moved["bundle_down"] = float(job.rt.take_fetched_bytes())  # the NanoEdge, if building this message's runtime fetched it
    return moved


def _memory(job: ClientJob) -> dict[str, int]:
    """Peak memory: of this client process (host), and of this message's work on its GPU (CUDA only)."""
    peak = peak_memory(job.rt.device)
    return {keys.PEAK_RSS_BYTES: peak_host_memory(), **({keys.PEAK_GPU_BYTES: peak} if peak is not None else {})}


app = ClientApp()


def _one_stream(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Each message gets its own split-channel stream, closed when the message's work ends (however it
    ends): a stream's deadline (federation.round_timeout) then bounds one message, not the whole run,
    and no idle stream holds a server thread between rounds."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        finally:
            for rt in _RUNTIMES.values():
                rt.split.end_session()

    return wrapped


@app.train()
@_one_stream
def train(msg: Message, context: Context) -> Message:
    method, job = _job(msg, context)
    before = job.rt.traffic()
    update = method.client_train(job, msg.content.array_records[keys.ARRAYS].to_torch_state_dict())
    content = RecordDict({keys.ARRAYS: ArrayRecord(update.state)})
    if update.fisher is not None:
        content[keys.FISHER] = ArrayRecord(update.fisher)
    content[keys.METRICS] = MetricRecord(
        {
            keys.NUM_EXAMPLES: update.num_examples,
            keys.PARTITION_ID: job.partition,
            keys.TRAIN_LOSS: update.train_loss,
            keys.SECONDS: time.time() - job.arrived,
            **_phases(job),
            **_traffic_delta(job, before),
            **_memory(job),
            **update.extra,  # (under their record keys)
        }
    )
    content[keys.CLIENT_INFO] = ConfigRecord({k: str(v) for k, v in describe(job.rt.device).items()})
    # what the node holds, in numbers only: sizes and the answers' histogram (never a sample)
    content[keys.DATA_INFO] = ConfigRecord({"train": len(job.data.train), "test": len(job.data.test),
                                            "labels": json.dumps(job.data.label_histogram())})
    return Message(content=content, reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which data partition this node holds, and of how many (the server asks once: to address clients that keep
    their own state, and to refuse nodes that claim one partition or another federation size)."""
    nc = context.node_config
    if keys.PARTITION_ID not in nc:
        raise ConfigError(f"node {context.node_id}: its node config has no partition-id")
    ident: dict = {k: int(keys.number(nc[k])) for k in (keys.PARTITION_ID, keys.NUM_PARTITIONS) if k in nc}
    return Message(content=RecordDict({keys.METRICS: MetricRecord(ident)}), reply_to=msg)


@app.evaluate()
@_one_stream
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the state it was sent (as the method answers with it) on this client's local test split."""
    method, job = _job(msg, context)
    before = job.rt.traffic()
    res = method.client_evaluate(job, msg.content.array_records[keys.ARRAYS].to_torch_state_dict())
    res.pop("num_examples")
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(job.data.test), keys.PARTITION_ID: job.partition, **res, **_phases(job),
                             **_traffic_delta(job, before)})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)

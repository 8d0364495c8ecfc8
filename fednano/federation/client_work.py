"""A client's work for one message: unpack it, let the method do the client's work, pack the reply.

Everything a client needs arrives in the message (the global state, the run config, the split
server's address, token and CA); what it keeps is cached per process (`ClientRuntime`: the
NanoEdge, image features, the split channel): across rounds in the simulation's Ray actors, and
under a SuperNode in the node's warm worker (node_worker.py), which the thin ClientApp
(client_app.py) hands each message to. Which method runs, and so what the client computes, is
the run config's registry entry. The handlers are functions of the message's content and the
node (`Node`), so that the ClientApp process and the worker run the same code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fednano.config import ConfigError, RunConfig, from_dict, with_node_settings
from fednano.data.partition import client_data, node_data
from fednano.data.samples import DataError
from fednano.devices import describe, peak_host_memory, peak_memory, reset_peak_memory
from fednano.errors import UserError
from fednano.federation import keys
from fednano.federation.node_worker import Node
from fednano.methods.registry import Method, method_of
from fednano.runtime.client import ClientJob, ClientRuntime

_RUNTIMES: dict[tuple[str, str, str, str, str, bool], ClientRuntime] = {}  # what this process holds, per run and node
_BUILT = [0]  # runtimes this process has built (a warm worker logs each build)


def _runtime(config_json: str, address: str, token: str, ca: str, digest: str, fetch: bool) -> ClientRuntime:
    key = (config_json, address, token, ca, digest, fetch)
    if key not in _RUNTIMES:
        while len(_RUNTIMES) >= 4:  # a simulation actor serves several nodes; keep the last few
            _RUNTIMES.pop(next(iter(_RUNTIMES))).split.close()
        _RUNTIMES[key] = ClientRuntime.build(from_dict(json.loads(config_json), "run-config"), address, token, ca, digest, fetch)
        _BUILT[0] += 1
    return _RUNTIMES[key]


def runtimes_built() -> int:
    return _BUILT[0]


def close_runtimes() -> None:
    """Close every split channel this process holds and forget the runtimes (a worker's exit, tests)."""
    for rt in _RUNTIMES.values():
        rt.split.close()
    _RUNTIMES.clear()


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


def _job(content: RecordDict, node: Node) -> tuple[Method, ClientJob]:
    conf = content.config_records[keys.CONFIG]
    name, node_config = node.name, dict(node.config)
    # the server's run config, with what this node sets for itself (batch size, device, threads, its own data)
    cfg = with_node_settings(from_dict(json.loads(str(conf[keys.RUN_CONFIG])), "run-config"), node_config, name)
    if cfg.data.on_nodes and keys.DATA_PATH not in node_config:  # never the packaged data (nor the run's) in its place
        raise DataError(f"{name}: data.on_nodes is set, but its node config names no data-path (the node's own data)")
    pid = _identity(node_config, cfg, name)
    # where this message's time goes: a fresh process's start (interpreter, imports, Flower loading the app), and when a
    # worker serves the message, the hand-over to it (its own start included, on a node's first message)
    seconds = {"start": node.start} if node.start is not None and (node.relayed is not None or not _RUNTIMES) else {}
    if node.relayed is not None:
        seconds["relay"] = max(0.0, node.relayed - node.arrived)
    try:  # the node's data (its own, or its partition of the simulation's) is read and checked here
        t = time.time()
        fetch = str(node_config.get(keys.FETCH_BUNDLE, 1)).lower() not in ("0", "false", "no")
        rt = _runtime(cfg.to_json(), str(conf[keys.SPLIT_ADDRESS]), str(conf.get(keys.SPLIT_TOKEN, "")), str(conf.get(keys.SPLIT_CA, "")),
                      str(conf.get(keys.BUNDLE_DIGEST, "")), fetch)
        seconds["build"], t = time.time() - t, time.time()
        data = node_data(rt.cfg) if cfg.data.on_nodes else client_data(rt.cfg, pid)
        seconds["data"] = time.time() - t
    except UserError as e:
        raise type(e)(f"{name}: {e}") from None
    # what never leaves the client lives on its own disk: the SuperNode's state-dir, or in simulation the run's folder
    root = node_config.get(keys.STATE_DIR) or conf.get(keys.CLIENT_STATE_DIR, "")
    reset_peak_memory(rt.device)  # the peak reported is this message's work
    job = ClientJob(rt, data, pid, int(keys.number(conf[keys.SERVER_ROUND])), Path(str(root)) if root else None)
    job.seconds, job.arrived = seconds, node.arrived
    return method_of(rt.cfg), job


def _opened(content: RecordDict, node: Node) -> tuple[Method, ClientJob, dict[str, int], dict[str, torch.Tensor]]:
    """The message's job, the split channel's counters before its work, and the state it was sent."""
    method, job = _job(content, node)
    return method, job, job.rt.traffic(), content.array_records[keys.ARRAYS].to_torch_state_dict()


def _phases(job: ClientJob) -> dict[str, float]:
    """The message's time by phase (keys.PHASE_PREFIX + start, relay, build, data, work)."""
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


def _one_stream(handler: Callable[[RecordDict, Node], RecordDict]) -> Callable[[RecordDict, Node], RecordDict]:
    """Each message gets its own split-channel stream, closed when the message's work ends (however it
    ends): a stream's deadline (federation.round_timeout) then bounds one message, not the whole run,
    and no idle stream holds a server thread between rounds."""

    def wrapped(content: RecordDict, node: Node) -> RecordDict:
        try:
            return handler(content, node)
        finally:
            for rt in _RUNTIMES.values():
                rt.split.end_session()

    wrapped.__doc__, wrapped.__name__ = handler.__doc__, handler.__name__
    return wrapped


@_one_stream
def train(content: RecordDict, node: Node) -> RecordDict:
    """Train the method's client part from the state it was sent; reply with the update (and its Fisher)."""
    method, job, before, state = _opened(content, node)
    update = method.client_train(job, state)
    reply = RecordDict({keys.ARRAYS: ArrayRecord(update.state)})
    if update.fisher is not None:
        reply[keys.FISHER] = ArrayRecord(update.fisher)
    reply[keys.METRICS] = MetricRecord(
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
    reply[keys.CLIENT_INFO] = ConfigRecord({k: str(v) for k, v in describe(job.rt.device).items()})
    # what the node holds, in numbers only: sizes and the answers' histogram (never a sample)
    reply[keys.DATA_INFO] = ConfigRecord({"train": len(job.data.train), "test": len(job.data.test),
                                          "labels": json.dumps(job.data.label_histogram())})
    return reply


@_one_stream
def evaluate(content: RecordDict, node: Node) -> RecordDict:
    """Accuracy of the state it was sent (as the method answers with it) on this client's local test split."""
    method, job, before, state = _opened(content, node)
    res = method.client_evaluate(job, state)
    res.pop("num_examples")
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(job.data.test), keys.PARTITION_ID: job.partition, **res, **_phases(job),
                             **_traffic_delta(job, before)})
    return RecordDict({keys.METRICS: metrics})


HANDLERS: dict[str, Callable[[RecordDict, Node], RecordDict]] = {"train": train, "evaluate": evaluate}

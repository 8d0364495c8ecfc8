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
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fednano.aggregation import STRATEGIES, Method
from fednano.config import RunConfig, from_dict
from fednano.data import load_task
from fednano.data.partition import ClientData, split_clients
from fednano.devices import describe, peak_host_memory, peak_memory, reset_peak_memory, resolve_device
from fednano.federation import keys
from fednano.fisher import empirical_fisher
from fednano.models.bundle import load_nanoedge, load_server_llm
from fednano.models.lora_llm import (
    GLOBAL,
    LOCAL,
    LoRAEndpoint,
    add_lora,
    load_lora_state,
    load_personal,
    lora_state,
    save_personal,
    set_active,
    train_only,
)
from fednano.models.nanoedge import NanoEdge
from fednano.models.server_llm import ServerLLM
from fednano.prepare import DTYPES, bundle_dir
from fednano.split.client import SplitClient
from fednano.training import ImageFeatures, LLMEndpoint, Workload, evaluate, exact_fisher_batches, train_local


@dataclass
class ClientRuntime:
    cfg: RunConfig
    edge: NanoEdge
    work: Workload
    split: SplitClient
    method: Method
    device: torch.device
    llm: ServerLLM | None = None  # full-MLLM baselines only: the whole LLM with LoRA, on the client
    local_init: dict[str, torch.Tensor] | None = None  # FedDPA-F: where a client's personal LoRA starts

    def endpoint(self) -> LLMEndpoint:
        """Where the LLM work goes: the split channel, or (full-MLLM baselines) the client's own LLM."""
        return LoRAEndpoint(self.llm) if self.llm is not None else self.split


@lru_cache(maxsize=4)
def _runtime(config_json: str, address: str, token: str, ca: str) -> ClientRuntime:
    cfg = from_dict(json.loads(config_json), "run-config")
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    device = resolve_device(cfg.model.client_device, "model.client_device")
    bundle = load_nanoedge(bundle_dir(cfg) / "client", cfg.adapter, device)  # client/ only: no LLM weights
    work = Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens, load_task(cfg).system)
    split = SplitClient(address, cfg.split.wire_dtype, cfg.split.max_frame_mb, cfg.federation.round_timeout,
                        token=token or None, root_certificates=ca.encode() if ca else None)
    method = STRATEGIES[cfg.federation.strategy]
    llm, local_init = None, None
    if method.client == "full-mllm":  # the comparison family: this client loads every LLM weight
        llm = load_server_llm(bundle_dir(cfg), DTYPES[cfg.model.llm_dtype], device)
        add_lora(llm, cfg.adapter, (GLOBAL, LOCAL) if method.personal else (GLOBAL,), seed=cfg.federation.seed)
        local_init = lora_state(llm, LOCAL) if method.personal else None
    return ClientRuntime(cfg, bundle.edge, work, split, method, device, llm, local_init)


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
    state = msg.content[keys.ARRAYS].to_torch_state_dict()
    if rt.llm is not None:
        load_lora_state(rt.llm, state, GLOBAL)
    else:
        rt.edge.load_adapter_state(state)
    reset_peak_memory(rt.device)  # the peak reported is this message's work
    return rt, client_data(rt.cfg, pid), pid, int(conf[keys.SERVER_ROUND])


def _local_lora_path(msg: Message, context: Context, pid: int) -> Path:
    """FedDPA-F's personal LoRA lives on the client's own disk (the SuperNode's `state-dir`,
    or in simulation the folder the run gives every client)."""
    root = context.node_config.get("state-dir") or msg.content[keys.CONFIG].get(keys.CLIENT_STATE_DIR, "")
    if not root:
        raise ValueError("feddpa-f needs a client state folder: set node config state-dir")
    return Path(str(root)) / f"partition-{pid}-local-lora.safetensors"


def _train_lora(rt: ClientRuntime, msg: Message, context: Context, data: ClientData, pid: int, gen: torch.Generator) -> dict:
    """fedit-lora / feddpa-f: local training of the LoRA inside the client's own LLM.

    FedDPA-F (sequential): first the global LoRA (alone) trains and is sent back;
    then the personal LoRA trains on top of the new global one, which stays frozen.
    """
    llm = rt.llm
    set_active(llm, (GLOBAL,))
    stats = train_local(rt.edge, rt.endpoint(), data.train, rt.work, rt.cfg.train, gen, params=train_only(llm, GLOBAL))
    if rt.method.personal:
        path = _local_lora_path(msg, context, pid)
        load_personal(llm, path, rt.local_init)
        set_active(llm, (GLOBAL, LOCAL))
        local = train_local(rt.edge, rt.endpoint(), data.train, rt.work, rt.cfg.train, gen, params=train_only(llm, LOCAL))
        save_personal(llm, path)
        stats["local_train_loss"] = local["train_loss"]
    stats["state"] = lora_state(llm, GLOBAL)
    return stats


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
    if rt.llm is not None:
        stats = _train_lora(rt, msg, context, data, pid, gen)
        content = RecordDict({keys.ARRAYS: ArrayRecord(stats.pop("state"))})
    else:
        samples, tcfg = data.train, rt.cfg.train
        if rt.method.topology == "centralized":  # one trainer, every client's data, the federation's total steps
            samples = [s for part in partitions(rt.cfg) for s in part.train]
            tcfg = replace(tcfg, local_steps=tcfg.local_steps * rt.cfg.data.num_clients)
        anchor = rt.edge.adapter_state() if mu > 0 else None  # the global adapters this round started from
        stats = train_local(rt.edge, rt.split, samples, rt.work, tcfg, gen, proximal_mu=mu, anchor=anchor,
                            accumulate_fisher=fisher_mode == "training")
        stats["num_examples"] = len(samples)
        content = RecordDict({keys.ARRAYS: ArrayRecord(rt.edge.adapter_state())})
        if fisher_mode == "training":
            content[keys.FISHER] = ArrayRecord(stats.pop("fisher"))
        elif fisher_mode == "pass":
            content[keys.FISHER] = ArrayRecord(_fisher_pass(rt, data.train, gen))
    content[keys.METRICS] = MetricRecord({
        keys.NUM_EXAMPLES: stats.get("num_examples", len(data.train)), keys.PARTITION_ID: pid, keys.TRAIN_LOSS: stats["train_loss"],
        keys.SECONDS: time.time() - t0, **_traffic_delta(rt, before), **_peak(rt),
    })
    content[keys.CLIENT_INFO] = ConfigRecord({k: str(v) for k, v in describe(rt.device).items()})
    return Message(content=content, reply_to=msg)


def _peak(rt: ClientRuntime) -> dict[str, int]:
    """Peak memory: of this client process (host), and of this message's work on its GPU (CUDA only)."""
    peak = peak_memory(rt.device)
    return {keys.PEAK_RSS_BYTES: peak_host_memory(), **({keys.PEAK_GPU_BYTES: peak} if peak is not None else {})}


def _fisher_pass(rt: ClientRuntime, train: list, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """FedNano's Fisher: an extra pass over `train.fisher_samples` of the client's samples."""
    t = rt.cfg.train
    n = min(t.fisher_samples, len(train))
    subset = [train[i] for i in torch.randperm(len(train), generator=gen)[:n].tolist()]
    if rt.cfg.federation.fisher_type == "exact":
        rows = exact_fisher_batches(rt.edge, rt.split, subset, rt.work, load_task(rt.cfg).candidate_sets, t.eval_batch_size)
    else:
        rows = (rt.work.train_batch(subset[i : i + t.batch_size]) for i in range(0, n, t.batch_size))
    fisher, _ = empirical_fisher(rt.edge, rt.split, rows)
    return fisher


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which data partition this node holds (the server asks once, to address `local` clients)."""
    return Message(content=RecordDict({keys.METRICS: MetricRecord({keys.PARTITION_ID: int(context.node_config[keys.PARTITION_ID])})}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the global adapters on this client's local test split."""
    rt, data, pid, _ = _setup(msg, context)
    before = rt.split.traffic()
    task = load_task(rt.cfg)
    if rt.llm is not None and rt.method.personal:  # FedDPA-F answers with global + personal LoRA
        has_own = load_personal(rt.llm, _local_lora_path(msg, context, pid), rt.local_init)
        set_active(rt.llm, (GLOBAL, LOCAL) if has_own else (GLOBAL,))
    res = evaluate(rt.edge, rt.endpoint(), data.test, rt.work, task.candidate_sets, rt.cfg.train.eval_batch_size, task.categories)
    res.pop("num_examples")
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(data.test), keys.PARTITION_ID: pid, **res, **_traffic_delta(rt, before)})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)



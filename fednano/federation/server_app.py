"""The ServerApp: holds the frozen LLM, serves the split channel, runs the rounds.

Per round: send the global NanoAdapters -> clients train through the split
channel (and compute their Fisher) -> validate and merge -> clients evaluate
the merged adapters on their local test splits -> the server evaluates them on
the global test set. results.json is rewritten after every round.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fednano.aggregation import STRATEGIES, Method
from fednano.config import RunConfig, load_config
from fednano.data import load_task
from fednano.data.partition import summary
from fednano.devices import describe, peak_host_memory, peak_memory, reset_peak_memory, resolve_device
from fednano.federation import keys
from fednano.federation.strategy import FedNanoStrategy
from fednano.metrics import by_category, merge_reports
from fednano.models.bundle import load_nanoedge, load_server_llm
from fednano.models.lora_llm import GLOBAL, add_lora, load_lora_state, lora_parameters, lora_state
from fednano.prepare import DTYPES, ensure_prepared
from fednano.progress import progress_bar
from fednano.results import BYTES_FIELDS, RunRecorder
from fednano.split.server import SplitServer
from fednano.training import ImageFeatures, Workload, evaluate

log = logging.getLogger("fednano")


class _OnWorker:
    """The server's in-process view of its LLM: work runs on the split server's LLM thread."""

    def __init__(self, llm, worker) -> None:
        self.llm, self.worker = llm, worker

    def train_step(self, *a, **kw):
        return self.worker.call(lambda: self.llm.train_step(*a, **kw))

    def score(self, *a, **kw):
        return self.worker.call(lambda: self.llm.score(*a, **kw))


def _array_bytes(arrays: ArrayRecord) -> int:
    return sum(int(a.numpy().nbytes) for a in arrays.values())


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> int:
    """Block until `wanted` SuperNodes are connected (deployments start them separately)."""
    deadline = time.time() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted:
        if time.time() > deadline:
            raise TimeoutError(f"only {n} of {wanted} clients (data.num_clients) connected within {timeout:g} s")
        log.info("waiting for clients: %d of %d connected", n, wanted)
        time.sleep(2.0)
    return n


def _ensure_log_handler() -> None:
    """Under `flwr run` the ServerApp runs in its own process with no handler for our logs."""
    logger = logging.getLogger("fednano")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class ServerSide:
    """What the server holds for a run: the frozen LLM behind the split server, and
    (it owns the whole MLLM) its own NanoEdge to evaluate global adapters itself."""

    def __init__(self, cfg: RunConfig, method: Method) -> None:
        self.cfg, self.method = cfg, method
        self.device = resolve_device(cfg.model.server_device, "model.server_device")
        self.bundle = ensure_prepared(cfg)
        self.llm = load_server_llm(self.bundle, DTYPES[cfg.model.llm_dtype], self.device, cfg.model.server_device_map)
        if method.client == "full-mllm":  # the global LoRA the baseline federates lives in this LLM
            add_lora(self.llm, cfg.adapter, (GLOBAL,), seed=cfg.federation.seed)
        sc = cfg.split
        self.secret = secrets.token_urlsafe(32) if sc.require_token else None
        tls = (Path(sc.tls_cert).read_bytes(), Path(sc.tls_key).read_bytes()) if sc.tls_cert else None
        self.split = SplitServer(self.llm, sc.host, sc.port, sc.max_frame_mb, secret=self.secret, tls=tls, max_streams=sc.max_streams,
                                 max_streams_per_client=sc.max_streams_per_client,
                                 batching=sc.micro_batching, batch_window_ms=sc.batch_window_ms, max_batch_tokens=sc.max_batch_tokens).start()
        self.address = sc.advertised_address or self.split.address
        owner = load_nanoedge(self.bundle / "client", cfg.adapter, self.llm.device)  # the server's own copy, next to its LLM
        self.edge = owner.edge
        self.work = Workload(owner.tokenizer, ImageFeatures(self.edge.vision), self.edge.num_visual_tokens)
        self.endpoint = _OnWorker(self.llm, self.split.service.worker)
        self.task = load_task(cfg)
        self.work.system, self.test = self.task.system, self.task.test

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The round-0 global trainable state, from federation.seed."""
        if self.method.client == "full-mllm":
            return lora_state(self.llm, GLOBAL)
        gen = torch.Generator().manual_seed(self.cfg.federation.seed)
        self.edge.adapter_i.reset_parameters(gen)
        self.edge.adapter_t.reset_parameters(gen)
        return self.edge.adapter_state()

    def evaluate(self, state: dict[str, torch.Tensor], desc: str = "global evaluation") -> dict[str, float]:
        """Accuracy of one trainable state on the global test set."""
        if self.method.client == "full-mllm":
            self.endpoint.worker.call(lambda: load_lora_state(self.llm, state, GLOBAL))
        else:
            self.edge.load_adapter_state(state)
        with progress_bar(len(self.test), desc) as bar:
            return evaluate(self.edge, self.endpoint, self.test, self.work, self.task.candidate_sets, self.cfg.train.eval_batch_size,
                            self.task.categories, on_batch=bar.update)

    def client_parameters(self) -> int:
        """Parameters one client holds: its NanoEdge; the full-MLLM baselines also the whole LLM and LoRA."""
        n = sum(p.numel() for p in self.edge.parameters())
        if self.method.client == "full-mllm":
            lora = sum(p.numel() for p in lora_parameters(self.llm, GLOBAL).values())
            # the LLM's own embedding table is the NanoEdge's; FedDPA-F holds a second (local) LoRA
            n += sum(p.numel() for p in self.llm.model.parameters()) - self.edge.embed_tokens.weight.numel() + (lora if self.method.personal else 0)
        return n

    def llm_seconds(self) -> float:
        return self.split.service.worker.busy_seconds

    def split_steps(self) -> int:
        return self.split.service.worker.steps["train_requests"]

    def devices(self) -> dict:
        """Where the server computes: the LLM's device (each shard's, when sharded), dtype and attention."""
        model = self.llm.model
        out = {**describe(self.llm.device), "dtype": self.cfg.model.llm_dtype,
               "attention": str(getattr(model.config.get_text_config(), "_attn_implementation", "") or "")}
        if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
            out["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
        return out

    def stop(self) -> None:
        self.split.stop()


def identify_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """Ask every node which data partition it holds (one small query message each)."""
    msgs = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in sorted(grid.get_node_ids())]
    out = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if not reply.has_error():
            out[reply.metadata.src_node_id] = int(reply.content[keys.METRICS][keys.PARTITION_ID])
    return out


def run_server(grid: Grid, cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict:
    t_start = time.time()
    _ensure_log_handler()
    recorder = RunRecorder(out_dir, cfg, resume=resume)
    if recorder.data.get("final"):
        log.info("%s: the run is already complete", out_dir)
        return recorder.data
    method = STRATEGIES[cfg.federation.strategy]
    side = ServerSide(cfg, method)
    try:
        _write_partition(out_dir, cfg, side.task)
        global_state = side.initial_state()
        # each node gets its own split-channel token inside its (TLS-protected) Flower message
        strategy = FedNanoStrategy(cfg.federation, per_node=lambda node: {keys.SPLIT_TOKEN: side.split.client_token(f"node-{node}") if side.secret else ""})
        saved = recorder.resume_state()
        first_round = 1
        if saved is not None:
            done, global_state, strategy_state = saved
            strategy.load_state_dict(strategy_state)
            first_round, zero_shot = done + 1, recorder.data["zero_shot_accuracy"]
            log.info("resuming %s after round %d of %d", out_dir, done, cfg.federation.rounds)
        else:
            zero = side.evaluate(global_state)
            zero_shot = zero["accuracy"]
            log.info("zero-shot accuracy of the prepared MLLM on %d global test questions: %.4f", len(side.test), zero_shot)
            task = side.task
            recorder.set(zero_shot_accuracy=zero_shot, zero_shot_by_category=by_category(zero), bundle=str(side.bundle), devices={"server": side.devices()},
                         data={"dataset": task.name, "train_pool": len(task.train), "global_test": len(side.test), "skipped": len(task.skipped),
                               "skipped_samples": task.skipped})

        wait_for_nodes(grid, cfg.data.num_clients, cfg.federation.round_timeout)
        strategy.node_partition.update(identify_partitions(grid, cfg.federation.round_timeout))
        strategy.summary()
        base_config = {keys.RUN_CONFIG: cfg.to_json(), keys.SPLIT_ADDRESS: side.address,
                       keys.SPLIT_CA: Path(cfg.split.tls_ca).read_text() if cfg.split.tls_ca else "",
                       keys.CLIENT_STATE_DIR: str(Path(out_dir).resolve() / "client-state")}
        acc = recorder.data["rounds"][-1]["global_accuracy"] if recorder.data["rounds"] else zero_shot
        with progress_bar(cfg.federation.rounds - first_round + 1, "rounds", position=0) as rounds_bar:
            for rnd in range(first_round, cfg.federation.rounds + 1):
                entry, global_state = _round(rnd, grid, cfg, side, strategy, global_state, base_config)
                recorder.data.setdefault("devices", {}).setdefault("clients", {}).update(
                    {str(o.partition_id): o.info for o in strategy.last_train if o.info})
                recorder.complete_round(entry, global_state, strategy.state_dict())
                acc = entry["global_accuracy"]
                rounds_bar.update(1, acc=acc)
                log.info(
                    "round %d/%d: global acc %.4f (zero-shot %.4f) | train loss %s | %d/%d clients merged | %.2f MiB moved | %.0f s",
                    rnd, cfg.federation.rounds, acc, zero_shot,
                    f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a",
                    entry["clients_accepted"], entry["clients_sampled"], sum(entry["bytes"].values()) / 2**20, entry["seconds"],
                )
        last = recorder.data["rounds"][-1]
        n_trainable = sum(v.numel() for v in global_state.values())
        final = {
            "global_accuracy": acc,
            "global_accuracy_by_category": last["global_accuracy_by_category"],
            "zero_shot_accuracy": zero_shot,
            "client_accuracy": last["client_accuracy"],
            "bytes_total": {k: sum(r["bytes"][k] for r in recorder.data["rounds"]) for k in BYTES_FIELDS},
            "adapter_parameters": n_trainable,
            "client_parameters": side.client_parameters(),
            # what one training client sends per round: its trainable state, plus its Fisher for FedNano
            "uploaded_parameters_per_round": n_trainable * (2 if method.wants_fisher else 1),
            "seconds": round(time.time() - t_start, 1),
            "devices": recorder.data.get("devices", {}),
            # random weights (model.random_init) measure time, memory and bytes only: their accuracy means nothing
            "random_weights": cfg.model.random_init,
        }
        recorder.finish(final, global_state)
        return recorder.data
    finally:
        side.stop()


def _round(rnd: int, grid: Grid, cfg: RunConfig, side: ServerSide, strategy: FedNanoStrategy, global_state: dict[str, torch.Tensor],
           base_config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """One round: train -> validate and merge -> clients evaluate -> the server evaluates.
    Returns the round's results.json entry and the new global state."""
    t0, llm0, steps0 = time.time(), side.llm_seconds(), side.split_steps()
    reset_peak_memory(side.llm.device)
    timeout = cfg.federation.round_timeout
    arrays = ArrayRecord(global_state)
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(base_config)), grid))
    t = cfg.train  # split steps per client: local training, then the Fisher pass
    per_client = t.local_steps * (cfg.data.num_clients if strategy.method.topology == "centralized" else 1)
    per_client += -(-t.fisher_samples // t.batch_size) if strategy.method.fisher == "pass" else 0
    with progress_bar(len(msgs) * per_client, f"round {rnd} split steps (all clients)", position=1) as steps_bar:
        side.split.service.on_frame = lambda op: steps_bar.update(1) if op == "train" else None
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        side.split.service.on_frame = None
    t_train = time.time() - t0
    merged, train_metrics = strategy.aggregate_train(rnd, replies)
    train_out = strategy.last_train
    for o in train_out:  # name clients by the partition they hold
        if o.partition_id is None:
            o.partition_id = strategy.node_partition.get(o.node_id)
    replied = {m.metadata.src_node_id for m in replies}
    dropped = [{"node_id": m.metadata.dst_node_id, "partition_id": strategy.node_partition.get(m.metadata.dst_node_id),
                "reason": f"no reply within round_timeout={timeout:g} s"}
               for m in msgs if m.metadata.dst_node_id not in replied]
    for d in dropped:
        log.warning("round %d: dropped node %d (partition %s): %s", rnd, d["node_id"], d["partition_id"], d["reason"])
    if merged is not None:
        global_state = merged.to_torch_state_dict()
    eval_msgs = list(strategy.configure_evaluate(rnd, ArrayRecord(global_state), ConfigRecord(dict(base_config)), grid))
    t1 = time.time()
    strategy.aggregate_evaluate(rnd, grid.send_and_receive(eval_msgs, timeout=timeout))
    t2 = time.time()
    client_global = {}
    if strategy.method.topology == "local":  # no global model: each client's own adapters on the global test, then the mean
        for pid, st in sorted(strategy.client_states.items()):
            client_global[str(pid)] = side.evaluate(st, f"global evaluation, client {pid}")
        report = merge_reports(list(client_global.values())) if client_global else side.evaluate(global_state)
    else:
        report = side.evaluate(global_state)

    ok = [o for o in train_out if not o.rejected]
    bytes_ = dict.fromkeys(BYTES_FIELDS, 0)
    bytes_["adapters_down"] = sum(_array_bytes(m.content[keys.ARRAYS]) for m in msgs + eval_msgs)
    bytes_["adapters_up"] = _array_bytes(arrays) * len([o for o in train_out if o.metrics])
    bytes_["fisher_up"] = bytes_["adapters_up"] if strategy.want_fisher else 0
    for o in train_out + strategy.last_evaluate:
        for k in keys.BYTES_KEYS:
            bytes_[k] += int(o.metrics.get(k, 0))
    entry = {
        "round": rnd,
        "global_accuracy": report["accuracy"],
        "global_accuracy_by_category": by_category(report),
        "client_accuracy": {str(o.partition_id): o.metrics[keys.ACCURACY] for o in strategy.last_evaluate if not o.rejected},
        "client_accuracy_by_category": {str(o.partition_id): by_category(o.metrics) for o in strategy.last_evaluate if not o.rejected},
        "train_loss": float(train_metrics[keys.TRAIN_LOSS]) if train_metrics else None,
        "client_train_loss": {str(o.partition_id): o.metrics[keys.TRAIN_LOSS] for o in ok},
        "train_examples": int(train_metrics[keys.NUM_EXAMPLES]) if train_metrics else 0,
        "aggregated": merged is not None,
        "clients_sampled": len(msgs),
        "clients_accepted": len(ok),
        "rejected": [{"node_id": o.node_id, "partition_id": o.partition_id, "reason": o.rejected} for o in train_out if o.rejected],
        "dropped": dropped,
        "bytes": bytes_,
        "split_steps": side.split_steps() - steps0,
        "server_llm_seconds": round(side.llm_seconds() - llm0, 2),
        "client_seconds": {str(o.partition_id): round(o.metrics[keys.SECONDS], 2) for o in train_out if keys.SECONDS in o.metrics},
        "phase_seconds": {"train": round(t_train, 2), "client_evaluation": round(t2 - t1, 2), "server_evaluation": round(time.time() - t2, 2)},
        "seconds": round(time.time() - t0, 2),
        "memory": _memory(side, train_out),
    }
    if client_global:
        entry["client_global_accuracy"] = {pid: r["accuracy"] for pid, r in client_global.items()}
    return entry, global_state


def _memory(side: ServerSide, train_out: list) -> dict:
    """Peak memory this round: the server process (host RSS, and the LLM's GPU when on CUDA) and
    each CUDA client (as it reported)."""
    out: dict = {"server_peak_rss_bytes": peak_host_memory()}
    gpu = peak_memory(side.llm.device)
    if gpu is not None:
        out["server_peak_gpu_bytes"] = gpu
    for key, name in ((keys.PEAK_RSS_BYTES, "client_peak_rss_bytes"), (keys.PEAK_GPU_BYTES, "client_peak_gpu_bytes")):
        clients = {str(o.partition_id): int(o.metrics[key]) for o in train_out if key in o.metrics}
        if clients:
            out[name] = clients
    return out


def _write_partition(out_dir: Path, cfg: RunConfig, task) -> None:
    """partition.json + partition.png: what each client holds (when the server can see the data)."""
    from fednano.federation.client_app import partitions
    from fednano.results import plot_partition

    rows = summary(partitions(cfg), cfg.data.partition_by)
    (Path(out_dir) / "partition.json").write_text(json.dumps({"partition_by": cfg.data.partition_by, "clients": rows}, indent=2))
    plot_partition(rows, cfg.data.partition_by, Path(out_dir) / "partition.png")


def build_server_app(cfg: RunConfig | None = None, out_dir: Path | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a config (simulation), or reading `config-file` /
    `output-dir` / `resume` from Flower's run config (`flwr run`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or load_config(context.run_config.get("config-file") or None)
        out = out_dir or Path(str(context.run_config.get("output-dir", "results/flwr-run")))
        run_server(grid, run_cfg, out, resume or bool(context.run_config.get("resume", False)))

    return server_app


app = build_server_app()

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
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fednano.config import RunConfig, load_config
from fednano.data import load_task
from fednano.data.partition import summary
from fednano.federation import keys
from fednano.federation.strategy import FedNanoStrategy
from fednano.metrics import by_category
from fednano.models.bundle import load_nanoedge, load_server_llm
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


def run_server(grid: Grid, cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict:
    t_start = time.time()
    _ensure_log_handler()
    recorder = RunRecorder(out_dir, cfg, resume=resume)
    if recorder.data.get("final"):
        log.info("%s: the run is already complete", out_dir)
        return recorder.data
    bundle = ensure_prepared(cfg)
    llm = load_server_llm(bundle, DTYPES[cfg.model.llm_dtype])
    sc = cfg.split
    secret = secrets.token_urlsafe(32) if sc.require_token else None
    tls = (Path(sc.tls_cert).read_bytes(), Path(sc.tls_key).read_bytes()) if sc.tls_cert else None
    split = SplitServer(llm, sc.host, sc.port, sc.max_frame_mb, secret=secret, tls=tls, max_streams=sc.max_streams,
                         max_streams_per_client=sc.max_streams_per_client,
                         batching=sc.micro_batching, batch_window_ms=sc.batch_window_ms).start()
    address = sc.advertised_address or split.address
    try:
        # The server owns the whole MLLM, so it evaluates the global adapters itself.
        owner = load_nanoedge(bundle / "client", cfg.adapter)
        edge = owner.edge
        work = Workload(owner.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens)
        local = _OnWorker(llm, split.service.worker)
        task = load_task(cfg)
        work.system, test = task.system, task.test
        _write_partition(out_dir, cfg, task)

        def global_eval(state: dict[str, torch.Tensor]) -> dict[str, float]:
            edge.load_adapter_state(state)
            with progress_bar(len(test), "global evaluation") as bar:
                return evaluate(edge, local, test, work, task.candidate_sets, cfg.train.eval_batch_size, task.categories, on_batch=bar.update)

        gen = torch.Generator().manual_seed(cfg.federation.seed)
        edge.adapter_i.reset_parameters(gen)
        edge.adapter_t.reset_parameters(gen)
        global_state = edge.adapter_state()
        state = recorder.resume_state()
        first_round = 1
        if state is not None:
            done, global_state = state
            first_round, zero_shot = done + 1, recorder.data["zero_shot_accuracy"]
            log.info("resuming %s after round %d of %d", out_dir, done, cfg.federation.rounds)
        else:
            zero = global_eval(global_state)
            zero_shot = zero["accuracy"]
            log.info("zero-shot accuracy of the prepared MLLM on %d global test questions: %.4f", len(test), zero_shot)
            recorder.set(zero_shot_accuracy=zero_shot, zero_shot_by_category=by_category(zero), bundle=str(bundle),
                         data={"dataset": task.name, "train_pool": len(task.train), "global_test": len(test), "skipped": len(task.skipped),
                               "skipped_samples": task.skipped})

        wait_for_nodes(grid, cfg.data.num_clients, cfg.federation.round_timeout)
        # each node gets its own split-channel token inside its (TLS-protected) Flower message
        strategy = FedNanoStrategy(cfg.federation, per_node=lambda node: {keys.SPLIT_TOKEN: split.client_token(f"node-{node}") if secret else ""})
        strategy.summary()
        base_config = {keys.RUN_CONFIG: cfg.to_json(), keys.SPLIT_ADDRESS: address, keys.SPLIT_CA: Path(sc.tls_ca).read_text() if sc.tls_ca else ""}
        t = cfg.train  # split steps per client: local training, then the Fisher pass
        steps_per_client = t.local_steps + (-(-t.fisher_samples // t.batch_size) if strategy.method.fisher == "pass" else 0)
        acc = recorder.data["rounds"][-1]["global_accuracy"] if recorder.data["rounds"] else zero_shot
        node_partition: dict[int, int] = {}
        with progress_bar(cfg.federation.rounds - first_round + 1, "rounds", position=0) as rounds_bar:
            for rnd in range(first_round, cfg.federation.rounds + 1):
                t0 = time.time()
                arrays = ArrayRecord(global_state)
                msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(base_config)), grid))
                with progress_bar(len(msgs) * steps_per_client, f"round {rnd} split steps (all clients)", position=1) as steps_bar:
                    split.service.on_frame = lambda op: steps_bar.update(1) if op == "train" else None
                    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout))
                    split.service.on_frame = None
                merged, train_metrics = strategy.aggregate_train(rnd, replies)
                train_out = strategy.last_train
                for o in train_out:  # learn which node holds which partition, to name clients in reports
                    if o.partition_id is not None:
                        node_partition[o.node_id] = o.partition_id
                    else:
                        o.partition_id = node_partition.get(o.node_id)
                replied = {m.metadata.src_node_id for m in replies}
                dropped = [{"node_id": m.metadata.dst_node_id, "partition_id": node_partition.get(m.metadata.dst_node_id),
                            "reason": f"no reply within round_timeout={cfg.federation.round_timeout:g} s"}
                           for m in msgs if m.metadata.dst_node_id not in replied]
                for d in dropped:
                    log.warning("round %d: dropped node %d (partition %s): %s", rnd, d["node_id"], d["partition_id"], d["reason"])
                if merged is not None:
                    global_state = merged.to_torch_state_dict()
                eval_msgs = list(strategy.configure_evaluate(rnd, ArrayRecord(global_state), ConfigRecord(dict(base_config)), grid))
                strategy.aggregate_evaluate(rnd, grid.send_and_receive(eval_msgs, timeout=cfg.federation.round_timeout))
                report = global_eval(global_state)
                acc = report["accuracy"]

                down = _array_bytes(arrays)
                ok = [o for o in train_out if not o.rejected]
                bytes_ = dict.fromkeys(BYTES_FIELDS, 0)
                bytes_["adapters_down"] = down * (len(msgs) + len(eval_msgs))
                bytes_["adapters_up"] = down * len([o for o in train_out if o.metrics])
                bytes_["fisher_up"] = down * len([o for o in train_out if o.metrics]) if strategy.want_fisher else 0
                for o in train_out + strategy.last_evaluate:
                    for k in keys.BYTES_KEYS:
                        bytes_[k] += int(o.metrics.get(k, 0))
                entry = {
                    "round": rnd,
                    "global_accuracy": acc,
                    "global_accuracy_by_category": by_category(report),
                    "client_accuracy": {str(o.partition_id): o.metrics[keys.ACCURACY] for o in strategy.last_evaluate if not o.rejected},
                    "client_accuracy_by_category": {str(o.partition_id): by_category(o.metrics) for o in strategy.last_evaluate if not o.rejected},
                    "train_loss": float(train_metrics[keys.TRAIN_LOSS]) if train_metrics else None,
                    "client_train_loss": {str(o.partition_id): o.metrics[keys.TRAIN_LOSS] for o in ok},
                    "aggregated": merged is not None,
                    "clients_sampled": len(msgs),
                    "clients_accepted": len(ok),
                    "rejected": [{"node_id": o.node_id, "partition_id": o.partition_id, "reason": o.rejected} for o in train_out if o.rejected],
                    "dropped": dropped,
                    "bytes": bytes_,
                    "seconds": round(time.time() - t0, 2),
                }
                recorder.complete_round(entry, global_state)
                rounds_bar.update(1, acc=acc)
                log.info(
                    "round %d/%d: global acc %.4f (zero-shot %.4f) | train loss %s | %d/%d clients merged | %.2f MiB moved | %.0f s",
                    rnd, cfg.federation.rounds, acc, zero_shot,
                    f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "n/a",
                    len(ok), len(msgs), sum(bytes_.values()) / 2**20, entry["seconds"],
                )
        last = recorder.data["rounds"][-1]
        final = {
            "global_accuracy": acc,
            "global_accuracy_by_category": last["global_accuracy_by_category"],
            "zero_shot_accuracy": zero_shot,
            "client_accuracy": last["client_accuracy"],
            "bytes_total": {k: sum(r["bytes"][k] for r in recorder.data["rounds"]) for k in BYTES_FIELDS},
            "adapter_parameters": sum(v.numel() for v in global_state.values()),
            "seconds": round(time.time() - t_start, 1),
        }
        recorder.finish(final, global_state)
        return recorder.data
    finally:
        split.stop()


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

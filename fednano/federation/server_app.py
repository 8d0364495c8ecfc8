"""The ServerApp: holds the frozen LLM, serves the split channel, runs the rounds.

A run is four named phases (`ServerRun`): start (or resume after the last completed round),
then per round train (send the global state -> clients train through the split channel and
compute what the method sends -> validate and combine) and evaluate (clients score the result on
their local test splits, the server on the global test set), and record (results.json and the
checkpoint, atomically: the commit point of a round). What the method does at each phase is
its registry entry's business (fednano/methods/).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fednano.backbones.bundle import BundleError
from fednano.backbones.digest import short
from fednano.config import ConfigError, RunConfig, load_config
from fednano.data.partition import partitions, summary
from fednano.experiments.diagnostics_plot import plot_merge_diagnostics
from fednano.experiments.results import BYTES_FIELDS, RoundRecord, RunRecorder, plot_partition
from fednano.federation import keys
from fednano.federation.accounts import SPENT, PrivacyAccounts, Traffic
from fednano.federation.strategy import ClientOutcome, FedNanoStrategy
from fednano.leakage import RoundAudit, plot_leakage
from fednano.methods.registry import method_of
from fednano.metrics import GENERATED, by_category, merge_reports
from fednano.progress import progress_bar
from fednano.runtime.server import ServerSide

log = logging.getLogger("fednano")
Tensors = dict[str, torch.Tensor]


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> int:
    """Block until `wanted` SuperNodes are connected (deployments start them separately)."""
    deadline = time.time() + timeout
    while (n := len(list(grid.get_node_ids()))) < wanted:
        if time.time() > deadline:
            raise TimeoutError(f"only {n} of {wanted} clients (data.num_clients) connected within {timeout:g} s")
        log.info("waiting for clients: %d of %d connected", n, wanted)
        time.sleep(2.0)
    return n


def identify_partitions(grid: Grid, timeout: float, num_clients: int | None = None) -> dict[int, int]:
    """Ask every node which data partition it holds (one small query message each). Two nodes claiming one
    partition-id, or a node whose num-partitions is not `num_clients` (data.num_clients), stop the run with a
    ConfigError naming the nodes."""
    msgs = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in sorted(grid.get_node_ids())]
    out: dict[int, int] = {}
    for reply in sorted(grid.send_and_receive(msgs, timeout=timeout), key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say which partition it holds: %s", node, reply.error.reason)
            continue
        ident = reply.content.metric_records[keys.METRICS]
        pid = int(keys.number(ident[keys.PARTITION_ID]))
        if num_clients is not None and keys.NUM_PARTITIONS in ident and int(keys.number(ident[keys.NUM_PARTITIONS])) != num_clients:
            raise ConfigError(f"node {node}: node config num-partitions={int(keys.number(ident[keys.NUM_PARTITIONS]))}, but the run "
                              f"has data.num_clients={num_clients}: refused")
        twin = next((n for n, p in out.items() if p == pid), None)
        if twin is not None:
            raise ConfigError(f"nodes {twin} and {node} both claim partition-id={pid} (node config): refused; give each SuperNode "
                              "its own partition-id")
        out[node] = pid
    return out


def _ensure_log_handler() -> None:
    """Under `flwr run` the ServerApp runs in its own process with no handler for our logs."""
    logger = logging.getLogger("fednano")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class TrainPhase:
    sent: list[Message]
    outcomes: list[ClientOutcome]
    metrics: MetricRecord | None
    aggregated: bool
    dropped: list[dict]
    seconds: float


@dataclass
class EvaluatePhase:
    sent: list[Message]
    report: dict[str, float]
    per_client: dict[str, dict] = field(default_factory=dict)  # clients' own states on the global test set
    client_seconds: float = 0.0
    server_seconds: float = 0.0


def clients_report(outcomes: list[ClientOutcome], rnd: int) -> dict[str, float]:
    """The clients' evaluations merged, each weighted by its number of questions (overall, per category,
    generated answers); NaN accuracy when no client's evaluation came back."""
    ok = [o for o in outcomes if not o.rejected and keys.ACCURACY in o.metrics]
    if not ok:
        log.warning("round %d: no client evaluation came back: the global accuracy is unknown (NaN)", rnd)
        return {"accuracy": float("nan")}
    return merge_reports([{**o.metrics, "num_examples": o.metrics[keys.NUM_EXAMPLES]} for o in ok])


@dataclass(frozen=True)
class Schedule:
    """What a round scores: the validation set (server), the global test set (server), the local test splits (clients)."""

    validate: bool
    test: bool
    clients: bool


def schedule(rnd: int, cfg: RunConfig) -> Schedule:
    """Without a validation set every round is scored on the global test set and the clients' local tests. With one
    (data.validation_samples), every federation.eval_every rounds and the last are validated; the global test set
    and the clients' tests are scored at the last round only (and at the best validation round, at the end), the
    clients also at validation rounds with federation.client_eval_every_round."""
    if not cfg.data.validation_samples:
        return Schedule(validate=False, test=True, clients=True)
    last = rnd == cfg.federation.rounds
    validate = last or rnd % cfg.federation.eval_every == 0
    return Schedule(validate, test=last, clients=last or (validate and cfg.federation.client_eval_every_round))


def _phases(outcomes: list[ClientOutcome]) -> dict[str, dict[str, float]]:
    """Where each client's message time went, as it reported (start, build, data, work; seconds)."""
    n = len(keys.PHASE_PREFIX)
    return {str(o.partition_id): {k[n:]: v for k, v in o.metrics.items() if k.startswith(keys.PHASE_PREFIX)} for o in outcomes if o.metrics}


class ServerRun:
    """One federated run on the server: the phases of each round, and what they share."""

    def __init__(self, grid: Grid, cfg: RunConfig, out_dir: Path, recorder: RunRecorder) -> None:
        self.grid, self.cfg, self.out_dir, self.recorder = grid, cfg, Path(out_dir), recorder
        self.method = method_of(cfg)
        self.side = ServerSide(cfg)
        self.part = self.method.trains.server(self.side)  # what the federation trains, on the server
        # each node gets its own split-channel token inside its (TLS-protected) Flower message
        self.strategy = FedNanoStrategy(cfg.federation, per_node=lambda node: {keys.SPLIT_TOKEN: self.side.client_token(node)},
                                        combine=self.method.combiner(cfg))
        self.global_state: Tensors = self.part.initial_state()
        self.audit = self._auditor() if cfg.privacy.audit else None
        self.privacy = PrivacyAccounts(cfg, self.out_dir / SPENT)  # what the run counts besides accuracy
        self.traffic = Traffic(self.side.llm.device)
        self.base_config = {keys.RUN_CONFIG: cfg.to_json(), keys.SPLIT_ADDRESS: self.side.address, keys.BUNDLE_DIGEST: self.side.digest,
                            keys.SPLIT_CA: Path(cfg.split.tls_ca).read_text() if cfg.split.tls_ca else "",
                            keys.CLIENT_STATE_DIR: str(self.out_dir.resolve() / "client-state")}

    # --- start or resume ---------------------------------------------------------------
    def start(self) -> int:
        """Resume after the last completed round, or score the starting state (zero-shot).
        Returns the first round to run."""
        self._write_partition()
        recorded = self.recorder.data.get("bundle_digest")
        if recorded and recorded != self.side.digest:  # resuming with another NanoEdge would mix two models' adapters
            raise BundleError(f"{self.out_dir}/results.json: the run used NanoEdge bundle {short(recorded)}; the server's "
                              f"{self.side.bundle / 'client'} is {short(self.side.digest)}: resume with the run's bundle")
        self.recorder.set(bundle_digest=self.side.digest)  # the client bundle every node held (backbones/digest.py)
        saved = self.recorder.resume_state()
        self.privacy.begin(saved[0] if saved is not None else 0, self.recorder.data.get("rounds", []))
        if saved is not None:
            done, self.global_state, strategy_state = saved
            self.strategy.load_state_dict(strategy_state)
            log.info("resuming %s after round %d of %d", self.out_dir, done, self.cfg.federation.rounds)
        elif self.cfg.data.server_test:  # scored while the nodes come up
            self._zero_shot(self.method.topology.evaluate(self.part, self.side, self.global_state, self.strategy.memory)[0])
            if self.cfg.data.validation_samples:
                self.recorder.set(zero_shot_validation_accuracy=self.validate())
        wait_for_nodes(self.grid, self.cfg.data.num_clients, self.cfg.federation.round_timeout)
        self.strategy.node_partition.update(identify_partitions(self.grid, self.cfg.federation.round_timeout, self.cfg.data.num_clients))
        self.strategy.summary()
        if saved is None and not self.cfg.data.server_test:  # the server holds no test set: the clients score it
            self._zero_shot(self.evaluate(0).report)
        if self.cfg.privacy.reproducible_noise:
            log.warning("privacy.reproducible_noise = true: every privacy noise draw is seeded by the config, which anyone who knows "
                        "it can recompute and subtract: this run is NOT private (results.json privacy.private = false); for tests only")
        if saved is None and self.privacy.local:
            self.recorder.set(privacy=self.privacy.local_guarantees(self.side))
        if saved is None and self.audit is not None:
            self.recorder.set(zero_shot_leakage=self.audited(0))
        return 1 if saved is None else saved[0] + 1

    def _auditor(self) -> RoundAudit:
        """privacy.audit's attacks, for methods whose clients send their NanoEdge's output through the split channel."""
        self.method.check(self.cfg)
        side = self.side
        return RoundAudit(self.cfg, side.edge, side.work, side.llm.model.get_input_embeddings().weight.detach(), side.llm)

    def audited(self, rnd: int) -> dict[str, float] | None:
        """What the server reads from the frames of the global adapters now (privacy.audit; None without it)."""
        if self.audit is None:
            return None
        self.part.load(self.global_state)
        found = self.audit()
        log.info("round %d: the server reads %.1f%% of text tokens, %.1f%% of answer tokens, %.1f%% of images (privacy.audit)", rnd,
                 100 * found["text_tokens_recovered"], 100 * found["answer_tokens_in_clear"], 100 * found["image_top1"])
        return found

    def _zero_shot(self, zero: dict[str, float]) -> None:
        task = self.side.task
        n = len(self.side.test) if task else zero.get("num_examples", 0)
        where = f"{n:.0f} " + ("global test questions" if task else "questions of the clients' own test splits")
        log.info("zero-shot accuracy of the prepared MLLM on %s: %.4f", where, zero["accuracy"])
        if GENERATED in zero:
            log.info("zero-shot accuracy of its generated answers: %.4f", zero[GENERATED])
            self.recorder.set(zero_shot_generated_accuracy=zero[GENERATED])
        data = ({"dataset": task.name, "train_pool": len(task.train), "global_test": len(self.side.test), "skipped": len(task.skipped),
                 "skipped_samples": task.skipped} if task else {"dataset": self.cfg.data.dataset, "global_test": "clients"})
        self.recorder.set(zero_shot_accuracy=zero["accuracy"], zero_shot_by_category=by_category(zero), bundle=str(self.side.bundle),
                          devices={"server": self.side.devices()}, data=data)

    def _node_data(self, outcomes: list[ClientOutcome]) -> None:
        """What each client reports holding (sizes, label histogram) into results.json's `node_data`; with
        data.on_nodes, partition.json and partition.png are drawn from these reports."""
        seen = self.recorder.data.setdefault("node_data", {})
        seen.update({str(o.partition_id): o.data for o in outcomes if o.data})
        if self.cfg.data.on_nodes and seen:
            rows = [{"client": int(pid), "train": d["train"], "test": d["test"], "answer": d["labels"]} for pid, d in sorted(seen.items())]
            self._write_rows(rows, "answer")

    def _write_partition(self) -> None:
        """partition.json + partition.png: what each client holds (when the server can see the data; with
        data.on_nodes the nodes' own reports after each round instead)."""
        if self.cfg.data.on_nodes:
            return
        self._write_rows(summary(partitions(self.cfg), self.cfg.data.partition_by), self.cfg.data.partition_by)

    def _write_rows(self, rows: list[dict], key: str) -> None:
        (self.out_dir / "partition.json").write_text(json.dumps({"partition_by": key, "clients": rows}, indent=2))
        plot_partition(rows, key, self.out_dir / "partition.png")

    # --- train ---------------------------------------------------------------------------
    def train(self, rnd: int) -> TrainPhase:
        """Clients train from the global state; accepted replies are combined into the next one."""
        t0, timeout = time.time(), self.cfg.federation.round_timeout
        sent = list(self.strategy.configure_train(rnd, ArrayRecord(self.global_state), ConfigRecord(dict(self.base_config)), self.grid))
        steps = len(sent) * self.method.split_steps_per_client(self.cfg)
        with progress_bar(steps, f"round {rnd} split steps (all clients)", position=1) as bar:
            self.side.split.service.on_frame = lambda op: bar.update(1) if op == "train" else None
            replies = list(self.grid.send_and_receive(sent, timeout=timeout))
            self.side.split.service.on_frame = None
        merged, metrics = self.strategy.aggregate_train(rnd, replies)
        outcomes = self.strategy.last_train
        for o in outcomes:  # name clients by the partition they hold
            if o.partition_id is None:
                o.partition_id = self.strategy.node_partition.get(o.node_id)
        replied = {m.metadata.src_node_id for m in replies}
        dropped = [{"node_id": m.metadata.dst_node_id, "partition_id": self.strategy.node_partition.get(m.metadata.dst_node_id),
                    "reason": f"no reply within round_timeout={timeout:g} s"} for m in sent if m.metadata.dst_node_id not in replied]
        for d in dropped:
            log.warning("round %d: dropped node %d (partition %s): %s", rnd, d["node_id"], d["partition_id"], d["reason"])
        if merged is not None:
            self.global_state = merged.to_torch_state_dict()
        return TrainPhase(sent, outcomes, metrics, merged is not None, dropped, time.time() - t0)

    # --- evaluate --------------------------------------------------------------------------
    def evaluate(self, rnd: int, when: Schedule = Schedule(False, True, True)) -> EvaluatePhase:
        """Clients score the new state on their local test splits; the server on the global test set (with
        data.server_test = false, the global accuracy is the clients' scores, example-weighted). `when` says
        which of the two run (`schedule`); a report left unscored is empty."""
        sent, t1 = [], time.time()
        self.strategy.last_evaluate = []
        if when.clients:
            sent = list(self.strategy.configure_evaluate(rnd, ArrayRecord(self.global_state), ConfigRecord(dict(self.base_config)),
                                                         self.grid))
            self.strategy.aggregate_evaluate(rnd, self.grid.send_and_receive(sent, timeout=self.cfg.federation.round_timeout))
        t2 = time.time()
        report: dict[str, float] = {}
        per_client: dict[str, dict] = {}
        if when.test and self.cfg.data.server_test:
            report, per_client = self.method.topology.evaluate(self.part, self.side, self.global_state, self.strategy.memory)
        elif when.test:  # the server holds no test set
            report = clients_report(self.strategy.last_evaluate, rnd)
        return EvaluatePhase(sent, report, per_client, t2 - t1, time.time() - t2)

    def validate(self) -> float:
        """The global state's accuracy on the validation set (data.validation_samples), scored by the server."""
        return self.method.topology.evaluate(self.part, self.side, self.global_state, self.strategy.memory, validation=True)[0]["accuracy"]

    def best_round(self) -> dict | None:
        """The best validation round's test scores: the global test set and the clients' local tests, scored at the end
        with that round's checkpointed state (the last round's scores if it is the best)."""
        best = self.recorder.data.get("best_validation")
        if not best:
            return None
        last = self.recorder.data["rounds"][-1]
        out = {"round": best["round"], "validation_accuracy": best["validation_accuracy"]}
        if best["round"] == last["round"]:
            return out | {k: last[k] for k in ("global_accuracy", "global_accuracy_by_category", "client_accuracy")}
        log.info("scoring the best validation round (%d) on the global test set", best["round"])
        current = self.global_state, self.strategy.state_dict()
        self.global_state, strategy_state = self.recorder.best_state()
        self.strategy.load_state_dict(strategy_state)
        try:
            ev = self.evaluate(best["round"], Schedule(validate=False, test=True, clients=True))
        finally:
            self.global_state = current[0]
            self.strategy.load_state_dict(current[1])
        return out | {"global_accuracy": ev.report["accuracy"], "global_accuracy_by_category": by_category(ev.report),
                      "client_accuracy": {str(o.partition_id): o.metrics[keys.ACCURACY] for o in self.strategy.last_evaluate
                                          if not o.rejected}}

    # --- record ----------------------------------------------------------------------------
    def record(self, rnd: int, train: TrainPhase, ev: EvaluatePhase, t0: float, llm0: float, steps0: int, spent: dict,
               validation: float | None = None) -> RoundRecord:
        """spent: the round's privacy entries (PrivacyAccounts.spend)."""
        ok = [o for o in train.outcomes if not o.rejected]
        evaluated = [o for o in self.strategy.last_evaluate if not o.rejected]
        m = train.metrics
        return RoundRecord(
            round=rnd,
            global_accuracy=ev.report.get("accuracy"),
            validation_accuracy=validation,
            global_accuracy_by_category=by_category(ev.report),
            client_accuracy={str(o.partition_id): o.metrics[keys.ACCURACY] for o in evaluated},
            client_accuracy_by_category={str(o.partition_id): by_category(o.metrics) for o in evaluated},
            train_loss=keys.number(m[keys.TRAIN_LOSS]) if m else None,
            client_train_loss={str(o.partition_id): o.metrics[keys.TRAIN_LOSS] for o in ok},
            train_examples=int(keys.number(m[keys.NUM_EXAMPLES])) if m else 0,
            aggregated=train.aggregated,
            clients_sampled=len(train.sent),
            clients_accepted=len(ok),
            rejected=[{"node_id": o.node_id, "partition_id": o.partition_id, "reason": o.rejected} for o in train.outcomes if o.rejected],
            dropped=train.dropped,
            bytes=self.traffic.bytes(train.sent + ev.sent, train.outcomes, self.strategy.last_evaluate,
                                     ArrayRecord(self.method.trains.shared(self.global_state)), self.method.sends_fisher),
            split_steps=self.side.split_steps() - steps0,
            server_llm_seconds=round(self.side.llm_seconds() - llm0, 2),
            client_seconds={str(o.partition_id): round(o.metrics[keys.SECONDS], 2) for o in train.outcomes if keys.SECONDS in o.metrics},
            phase_seconds={
                "train": round(train.seconds, 2),
                "client_evaluation": round(ev.client_seconds, 2),
                "server_evaluation": round(ev.server_seconds, 2),
            },
            seconds=round(time.time() - t0, 2),
            memory=self.traffic.memory(train.outcomes),
            client_global_accuracy={pid: r["accuracy"] for pid, r in ev.per_client.items()} or None,
            client_phase_seconds={"train": _phases(train.outcomes), "evaluate": _phases(self.strategy.last_evaluate)},
            merge_diagnostics=self.strategy.last_diagnostics,
            **spent,
            **self._generated(ev, evaluated),
        )

    @staticmethod
    def _generated(ev: EvaluatePhase, evaluated: list[ClientOutcome]) -> dict:
        """The generated answers' scores (data.scoring = "generate"), where they were measured."""
        if GENERATED not in ev.report:
            return {}
        return {"global_generated_accuracy": ev.report[GENERATED],
                "global_generated_by_category": by_category(ev.report, "gen_acc/"),
                "client_generated_accuracy": {str(o.partition_id): o.metrics[GENERATED] for o in evaluated if GENERATED in o.metrics}}

    def round(self, rnd: int) -> RoundRecord:
        """Train -> evaluate -> record one round, and commit it (results.json + checkpoint)."""
        t0, llm0, steps0 = time.time(), self.side.llm_seconds(), self.side.split_steps()
        self.traffic.start_round()
        train = self.train(rnd)
        spent = self.privacy.spend([o for o in train.outcomes if not o.rejected])  # counted before the model leaves
        when = schedule(rnd, self.cfg)
        ev = self.evaluate(rnd, when)
        t_val = time.time()
        validation = self.validate() if when.validate else None
        rec = self.record(rnd, train, ev, t0, llm0, steps0, spent, validation)
        rec.phase_seconds["validation"] = round(time.time() - t_val, 2)
        t_audit = time.time()
        rec.leakage = self.audited(rnd)
        rec.phase_seconds["audit"] = round(time.time() - t_audit, 2)
        self.recorder.data.setdefault("devices", {}).setdefault("clients", {}).update(
            {str(o.partition_id): o.info for o in train.outcomes if o.info}
        )
        self._node_data(train.outcomes)
        best = self.recorder.data.get("best_validation", {}).get("validation_accuracy", float("-inf"))
        self.recorder.complete_round(rec, self.global_state, self.strategy.state_dict(), best=validation is not None and validation > best)
        return rec

    def finish(self, t_start: float) -> dict:
        data = self.recorder.data
        last, n_trainable = data["rounds"][-1], sum(v.numel() for v in self.global_state.values())
        final = {
            "global_accuracy": last["global_accuracy"],
            "global_accuracy_by_category": last["global_accuracy_by_category"],
            "zero_shot_accuracy": data["zero_shot_accuracy"],
            "client_accuracy": last["client_accuracy"],
            **{k: v for k, v in (("generated_accuracy", last.get("global_generated_accuracy")),
                                 ("zero_shot_generated_accuracy", data.get("zero_shot_generated_accuracy"))) if v is not None},
            "bytes_total": {k: sum(r["bytes"].get(k, 0) for r in data["rounds"]) for k in BYTES_FIELDS},
            "adapter_parameters": n_trainable,
            "client_parameters": self.part.client_parameters(),
            # what one training client sends per round: its trainable state, plus its Fisher for FedNano
            "uploaded_parameters_per_round": sum(v.numel() for v in self.method.trains.shared(self.global_state).values())
            * (2 if self.method.sends_fisher else 1),
            **({"validation_accuracy": last["validation_accuracy"], "best_validation": self.best_round()}
               if self.cfg.data.validation_samples else {}),
            **self.privacy.final(last),
            "seconds": round(time.time() - t_start, 1),
            "devices": data.get("devices", {}),
            # random weights (model.random_init) measure time, memory and bytes only: their accuracy means nothing
            "random_weights": self.cfg.model.random_init,
        }
        self.recorder.finish(final, self.global_state)
        if self.audit is not None:
            plot_leakage(data, self.out_dir / "leakage.png")
        if self.cfg.federation.merge_diagnostics:
            plot_merge_diagnostics(data, self.out_dir / "merge_diagnostics.png")
        return data


def run_server(grid: Grid, cfg: RunConfig, out_dir: Path, resume: bool = False) -> dict:
    t_start = time.time()
    _ensure_log_handler()
    recorder = RunRecorder(out_dir, cfg, resume=resume)
    if recorder.data.get("final"):
        log.info("%s: the run is already complete", out_dir)
        return recorder.data
    run = ServerRun(grid, cfg, out_dir, recorder)
    try:
        first = run.start()
        zero_shot = recorder.data["zero_shot_accuracy"]
        with progress_bar(cfg.federation.rounds - first + 1, "rounds", position=0) as rounds_bar:
            for rnd in range(first, cfg.federation.rounds + 1):
                rec = run.round(rnd)
                shown = rec.global_accuracy if rec.global_accuracy is not None else rec.validation_accuracy
                rounds_bar.update(1, **({"acc": shown} if shown is not None else {}))
                log.info(
                    "round %d/%d: %s (zero-shot %.4f) | train loss %s | %d/%d clients merged | %.2f MiB moved | %.0f s",
                    rnd,
                    cfg.federation.rounds,
                    _scores(rec),
                    zero_shot,
                    f"{rec.train_loss:.4f}" if rec.train_loss is not None else "n/a",
                    rec.clients_accepted,
                    rec.clients_sampled,
                    sum(rec.bytes.values()) / 2**20,
                    rec.seconds,
                )
                if rec.global_generated_accuracy is not None:
                    log.info("round %d: global acc of generated answers %.4f", rnd, rec.global_generated_accuracy)
        return run.finish(t_start)
    finally:
        run.side.stop()


def _scores(rec: RoundRecord) -> str:
    """The round's accuracies for the log line (only those scored this round)."""
    scored = (("global", rec.global_accuracy), ("validation", rec.validation_accuracy))
    parts = [f"{name} acc {v:.4f}" for name, v in scored if v is not None]
    return " | ".join(parts) or "not scored (federation.eval_every)"


def build_server_app(cfg: RunConfig | None = None, out_dir: Path | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a config (simulation), or reading `config-file` /
    `output-dir` / `resume` from Flower's run config (`flwr run`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config_file = context.run_config.get(keys.CONFIG_FILE)
        run_cfg = cfg or load_config(str(config_file) if config_file else None)
        out = out_dir or Path(str(context.run_config.get(keys.OUTPUT_DIR, "results/flwr-run")))
        run_server(grid, run_cfg, out, resume or bool(context.run_config.get("resume", False)))

    return server_app


app = build_server_app()

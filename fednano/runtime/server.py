"""What the server holds for a run: the frozen LLM behind the split server, the global test set,
and (it owns the whole MLLM) its own NanoEdge, to score global states on the global test set.

It knows nothing of methods: what the federation trains is loaded into it by the method's
server part (`methods.trainables`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fednano.backbones.bundle import BundleError, load_nanoedge, load_server_llm
from fednano.backbones.digest import digest as bundle_digest
from fednano.backbones.prepare import bundle_dir, ensure_prepared
from fednano.backbones.registry import BACKBONES
from fednano.client.evaluation import Scoring, evaluate
from fednano.client.features import ImageFeatures, Workload
from fednano.config import ConfigError, RunConfig
from fednano.data import load_task, system_prompt
from fednano.data.samples import DataError, Task
from fednano.devices import describe, dtype_of, resolve_device
from fednano.progress import progress_bar
from fednano.split.endpoint import LLMEndpoint
from fednano.split.server import SplitServer


def preflight(cfg: RunConfig) -> None:
    """What the server can check before it prepares, loads or starts anything: its device, its data
    (the global test set and the pool the simulation partitions) and the backbone's source. Raises
    the UserError (ConfigError, DataError, BundleError) that names the field, file or sample."""
    resolve_device(cfg.model.server_device, "model.server_device")
    d, m = cfg.data, cfg.model
    try:
        if d.server_test:  # else the server reads no data at all
            load_task(cfg)  # cached: the run reuses it
    except DataError as e:
        where = f"data.dataset={d.dataset!r}" + (f", data.path={d.path!r}" if d.path else "")
        raise DataError(f"{where}: {e}") from None
    if (bundle_dir(cfg) / "prepare.json").exists():
        return  # prepared already: the source is not read again
    backbone = BACKBONES[m.backbone]
    try:
        backbone.check_source(m)
    except BundleError as e:
        raise BundleError(f"model.backbone={m.backbone!r}, {backbone.source_field}: {e}") from None


class ServerSide:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        device = resolve_device(cfg.model.server_device, "model.server_device")
        # bad data fails here, before the backbone is prepared or loaded; with data.server_test = false the server reads none
        self.task: Task | None = load_task(cfg) if cfg.data.server_test else None
        self.bundle = ensure_prepared(cfg)
        self.digest = bundle_digest(self.bundle / "client")  # what every node must hold; the split server hands it out
        self.llm = load_server_llm(self.bundle, dtype_of(cfg.model.llm_dtype), device, cfg.model.server_device_map)
        self.llm.set_attention(cfg.model.attention)
        if cfg.model.compile:
            self.llm.compile_training()
        if cfg.split.label_private and not getattr(self.llm.model.config.get_text_config(), "tie_word_embeddings", False):
            raise ConfigError("split.label_private: this backbone's output head is not its input-embedding table, which is all a "
                              "client holds of it; the U-shaped split would need the head in the client bundle (not built)")
        sc = cfg.split
        self.secret = secrets.token_urlsafe(32) if sc.require_token else None
        tls = (Path(sc.tls_cert).read_bytes(), Path(sc.tls_key).read_bytes()) if sc.tls_cert else None
        self.split = SplitServer(self.llm, sc, secret=self.secret, tls=tls, bundle=self.bundle / "client").start()
        self.address = sc.advertised_address or self.split.address
        owner = load_nanoedge(self.bundle / "client", cfg.adapter, self.llm.device)  # the server's own copy, next to its LLM
        self.edge, self.test = owner.edge, self.task.test if self.task else []
        self.work = Workload(owner.tokenizer, ImageFeatures(self.edge.vision), self.edge.num_visual_tokens,
                             self.task.system if self.task else system_prompt(cfg.data.dataset))
        self.endpoint: LLMEndpoint = self.split.service.worker.endpoint()  # the LLM, on its one thread

    def on_llm_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the thread that runs the LLM (e.g. to change its LoRA between evaluations)."""
        return self.split.service.worker.call(fn)

    def client_token(self, node: int) -> str:
        """The split-channel token of one node ("" when the run needs none)."""
        return self.split.client_token(f"node-{node}") if self.secret else ""

    def evaluate(self, endpoint: LLMEndpoint, desc: str = "global evaluation", validation: bool = False) -> dict[str, float]:
        """Accuracy of what the server's NanoEdge and `endpoint` hold now, on the global test set (or on the
        validation set held out of the training pool, data.validation_samples)."""
        if self.task is None:
            raise RuntimeError("data.server_test = false: the server holds no test set; the clients evaluate")
        samples = self.task.validation if validation else self.test
        if validation:
            desc = desc.replace("global evaluation", "validation")
        scoring = Scoring.of(self.cfg.data, self.task)
        with progress_bar(len(samples) * scoring.passes, desc) as bar:
            return evaluate(self.edge, endpoint, samples, self.work, self.task.candidate_sets, self.cfg.train.eval_batch_size,
                            self.task.categories, on_batch=bar.update, scoring=scoring)

    def edge_parameters(self) -> int:
        return sum(p.numel() for p in self.edge.parameters())

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

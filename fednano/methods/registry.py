"""Every federated method FedNano runs: one entry each, made of the objects that carry its behaviour.

    trains    what the federation trains: the NanoAdapters through the split channel, or LoRA inside
              a whole LLM that each client holds (the comparison family), with or without a personal part
    fisher    what a client sends besides its weights: nothing, a Fisher from an extra pass, or from training
    combine   how the server merges accepted replies: average, Fisher merging, or average + a server optimiser
    topology  who trains on what, what each node is sent, and how the result is evaluated
    proximal  the client adds FedProx's mu/2 ||theta - theta_global||^2 to its loss

The ClientApp and the ServerApp only call these objects; a new method is one new entry and its tests
(config.py validates `federation.strategy` with this registry's names and each entry's `check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fednano.client.evaluation import Scoring, evaluate
from fednano.client.training import Proximal, StepHook
from fednano.config import ConfigError, RunConfig
from fednano.federation import keys
from fednano.methods.combiners import Average, ClientDP, ClientDPFisher, FisherMerge, ProductMerge, ServerOptimiser
from fednano.methods.fisher_sources import FisherOfTraining, FisherPass, NoFisher, diagnostic_fisher
from fednano.methods.nanoadapters import NanoAdapters
from fednano.methods.topologies import Centralized, Federated, Local
from fednano.methods.whole_llm import WholeLLMLoRA
from fednano.privacy import noise_for_epsilon
from fednano.runtime.client import ClientJob, ClientRuntime


@dataclass(frozen=True)
class ClientUpdate:
    """What a client's training produced: its new state, its Fisher (or None), and its numbers."""

    state: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    train_loss: float
    num_examples: int
    extra: dict[str, float]  # more metrics for the reply, under their record keys (federation/keys.py)


@dataclass(frozen=True)
class Method:
    name: str
    trains: NanoAdapters | WholeLLMLoRA
    fisher: NoFisher
    combine: Average
    topology: Federated
    proximal: bool = False

    @property
    def sends_fisher(self) -> bool:
        return self.fisher.sends_fisher

    def complete(self, reference: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global state from what was merged (the shared part) and what no client changes."""
        return {**reference, **merged}

    def check(self, cfg: RunConfig) -> None:
        """Refuse settings this method cannot honour (ConfigError naming the field). RunConfig calls it on every config."""
        if cfg.data.on_nodes and self.topology.pools_data:
            raise ConfigError(f"data.on_nodes: {self.name!r} trains on every client's data on the server, which nodes that keep "
                              "their own data do not allow")
        if cfg.privacy.audit and (self.trains.in_llm or self.topology.personal_models):
            raise ConfigError(f"privacy.audit: {self.name!r} has no global NanoEdge adapters whose frames to audit "
                              "(its clients hold the whole LLM, or keep adapters of their own)")
        if cfg.privacy.client_dp and (self.combine.kind not in ("average", "fisher") or self.topology.kind != "federated"):
            raise ConfigError(f"privacy.client_dp: {self.name!r} is neither a FedAvg-family nor a Fisher-merging federated method "
                              "(client-level DP needs one global merge of client updates; merging products under DP is not built): "
                              "use fednano, fednano-ef, fednano-ffa, fedavg, fedprox, fedadam, fedyogi or fedit-lora")
        if cfg.privacy.label_epsilon and self.topology.pools_data:
            raise ConfigError("privacy.label_epsilon: 'centralized' pools every client's data, answers included, on the server; "
                              "randomized response protects what a client sends")
        if cfg.federation.merge_diagnostics and (self.trains.in_llm or self.topology.kind != "federated"):
            raise ConfigError(f"federation.merge_diagnostics: {self.name!r} has no global merge of NanoAdapters to diagnose")
        if cfg.federation.merge_diagnostics and cfg.privacy.client_dp:
            raise ConfigError("federation.merge_diagnostics: under privacy.client_dp the diagnostics would publish each client's "
                              "Fisher and update, which the DP guarantee does not cover")
        if cfg.federation.fisher_at == "global" and not self.fisher_source(cfg).takes_pass:
            raise ConfigError(f"federation.fisher_at: {self.name!r} takes no Fisher pass (its Fisher, if any, comes from its training "
                              "gradients): leave it 'trained'")
        if cfg.privacy.dp_sgd and (self.trains.in_llm or self.trains.personal):
            raise ConfigError(f"privacy.dp_sgd: {self.name!r} trains LoRA inside a whole LLM; DP-SGD is built for the NanoAdapters "
                              "(per-sample gradients in closed form): use a NanoEdge method")

    def combiner(self, cfg: RunConfig) -> Average:
        """What the server combines with for this run: the method's own combiner, inside DP-FedAvg with privacy.client_dp."""
        if not cfg.privacy.client_dp:
            return self.combine
        noise, _ = client_dp_noise(cfg)
        if self.combine.kind == "fisher":
            return ClientDPFisher(clip=cfg.privacy.clip_norm, noise_multiplier=noise, expected_clients=expected_clients(cfg),
                                  by_rank=cfg.privacy.fisher_groups == "rank", reproducible=cfg.privacy.reproducible_noise)
        return ClientDP(inner=self.combine, clip=cfg.privacy.clip_norm, noise_multiplier=noise, expected_clients=expected_clients(cfg),
                        reproducible=cfg.privacy.reproducible_noise)

    def fisher_source(self, cfg: RunConfig) -> NoFisher:
        """Where this run's Fisher comes from: the method's own, except under privacy.dp_sgd, where a Fisher-merging
        method takes it from the noised training gradients (post-processing: no privacy spent beyond DP-SGD's)."""
        return FisherOfTraining() if cfg.privacy.dp_sgd and self.sends_fisher else self.fisher

    def split_steps_per_client(self, cfg: RunConfig) -> int:
        """Training split steps each sampled client takes per round (for progress bars)."""
        return self.topology.local_steps(cfg) + self.fisher_source(cfg).split_steps(cfg.train)

    # --- the client --------------------------------------------------------------------
    def client_part(self, rt: ClientRuntime) -> Any:
        """What this method keeps in a client process (built once per process)."""
        if rt.part is None:
            rt.part = self.trains.client(rt)
        return rt.part

    def client_train(self, job: ClientJob, start: dict[str, torch.Tensor]) -> ClientUpdate:
        """One client's round: train from `start` (the state it was sent), then its Fisher."""
        part = self.client_part(job.rt)
        part.load(start)
        samples, tcfg = self.topology.client_work(job)
        source = self.fisher_source(job.cfg)
        hooks: list[StepHook] = source.hooks()  # a Fisher of the training gradients comes first
        mu = job.cfg.federation.proximal_mu
        if self.proximal and mu > 0:
            hooks.append(Proximal(start, mu))
        at_global = source.takes_pass and job.cfg.federation.fisher_at == "global"
        fisher = source.fisher(job, part, hooks) if at_global else None  # at the state it received, before training
        loss, state, extra = part.train(job, samples, tcfg, hooks)
        if not at_global:
            fisher = source.fisher(job, part, hooks)
        if job.cfg.federation.merge_diagnostics:  # (after training: the paper's Fisher, whatever this run merges with)
            diagnostic, error = diagnostic_fisher(job, part, check=job.round % job.cfg.federation.eval_every == 0
                                                  or job.round == job.cfg.federation.rounds)
            fisher = diagnostic if fisher is None else fisher
            extra = extra | ({keys.FISHER_REL_ERROR: error} if error is not None else {})
        return ClientUpdate(self.trains.shared(state), None if fisher is None else self.trains.shared(fisher), loss, len(samples), extra)

    def client_evaluate(self, job: ClientJob, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy of `state` (as this client answers with it) on the client's local test split."""
        part = self.client_part(job.rt)
        part.load(state)
        rt = job.rt
        return evaluate(rt.edge, part.endpoint(job), job.data.test, rt.work, rt.task.candidate_sets, job.cfg.train.eval_batch_size,
                        rt.task.categories, scoring=Scoring.of(job.cfg.data, rt.task))

    def describe(self) -> dict[str, Any]:
        """The method's parts, by name (for logs, docs and tests; nothing dispatches on these)."""
        return {"combine": self.combine.kind, "fisher": self.fisher.kind, "proximal": self.proximal, "server_opt": self.combine.server_opt,
                "topology": self.topology.kind, "client": self.trains.kind, "personal": self.trains.personal}


# One entry per method.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fednano", NanoAdapters(), FisherPass(), FisherMerge(), Federated()),
    Method("fednano-ef", NanoAdapters(), FisherOfTraining(), FisherMerge(), Federated()),
    Method("fednano-product", NanoAdapters(), FisherPass(), ProductMerge(), Federated()),
    Method("fednano-ffa", NanoAdapters(frozen_a=True), FisherPass(), FisherMerge(), Federated()),
    Method("fedavg", NanoAdapters(), NoFisher(), Average(), Federated()),
    Method("fedprox", NanoAdapters(), NoFisher(), Average(), Federated(), proximal=True),
    Method("fedadam", NanoAdapters(), NoFisher(), ServerOptimiser("adam"), Federated()),
    Method("fedyogi", NanoAdapters(), NoFisher(), ServerOptimiser("yogi"), Federated()),
    Method("local", NanoAdapters(), NoFisher(), Average(), Local()),
    Method("centralized", NanoAdapters(), NoFisher(), Average(), Centralized()),
    Method("fedit-lora", WholeLLMLoRA(), NoFisher(), Average(), Federated()),
    Method("feddpa-f", WholeLLMLoRA(personal=True), NoFisher(), Average(), Federated()),
)}


def expected_clients(cfg: RunConfig) -> float:
    """privacy.client_dp's expected clients per round, q N: Federated.sample then takes each of the N nodes independently
    with probability q = federation.fraction_train (Poisson sampling). DP-FedAvg's fixed denominator; over N, the
    accountant's sampling rate."""
    return cfg.data.num_clients * cfg.federation.fraction_train


def client_dp_noise(cfg: RunConfig) -> tuple[float, float]:
    """privacy.client_dp's (noise multiplier the server adds, the one its accountant sees): privacy.noise_multiplier, or
    the one that spends privacy.target_epsilon in federation.rounds rounds at the client sampling rate. Fisher merging
    releases two noised sums per round (aggregation.dp_fisher_merge): its accountant sees the multiplier over sqrt(2)."""
    p = cfg.privacy
    releases = 2 if method_of(cfg).combine.kind == "fisher" else 1
    if not p.target_epsilon:
        return p.noise_multiplier, p.noise_multiplier / math.sqrt(releases)
    seen = noise_for_epsilon(p.target_epsilon, p.delta, expected_clients(cfg) / cfg.data.num_clients, cfg.federation.rounds)
    return seen * math.sqrt(releases), seen


def method_of(cfg: RunConfig) -> Method:
    try:
        return METHODS[cfg.federation.strategy]
    except KeyError:
        raise ConfigError(f"federation.strategy: unknown method {cfg.federation.strategy!r}; choose one of {list(METHODS)}") from None

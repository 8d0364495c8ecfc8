"""Who trains, on what, and what the server does with the replies: every client on its own data
with a merged global state (federated), every client on its own adapters with nothing merged
(local), or one trainer that holds every client's data (centralized, the upper bound)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from fednano.config import FederationConfig, RunConfig, TrainConfig
from fednano.data.partition import partitions
from fednano.data.samples import Sample
from fednano.methods.combiners import Average, ServerMemory
from fednano.metrics import merge_reports
from fednano.runtime.client import ClientJob
from fednano.runtime.server import ServerSide

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """One accepted client reply."""

    partition: int
    theta: Tensors
    fisher: Tensors | None
    examples: float


@dataclass(frozen=True)
class Federated:
    kind = "federated"
    personal_models = False  # the run's model is the global state; clients keep no models of their own
    pools_data = False  # every client trains on its own data where it is

    # --- the server ------------------------------------------------------------------
    def sample(self, nodes: list[int], rnd: int, cfg: FederationConfig, poisson: random.Random | None = None) -> list[int]:
        """The nodes that train this round: a seeded share `fraction_train` of them (a fixed number, so runs repeat); with
        `poisson` (privacy.client_dp: ClientDP.sampler, OS entropy), each node independently with probability fraction_train,
        as the DP accountant assumes: the number varies from round to round and may be 0."""
        nodes = sorted(nodes)
        if poisson is not None:
            return [n for n in nodes if poisson.random() < cfg.fraction_train]
        k = max(1, min(len(nodes), round(len(nodes) * cfg.fraction_train)))
        return sorted(random.Random(f"{cfg.seed}-{rnd}").sample(nodes, k))

    def evaluators(self, nodes: list[int], rnd: int, cfg: FederationConfig) -> list[int]:
        """The nodes that score this round's model on their local test splits: a seeded share `fraction_evaluate`."""
        nodes = sorted(nodes)
        if cfg.fraction_evaluate >= 1.0:
            return nodes
        k = max(1, min(len(nodes), round(len(nodes) * cfg.fraction_evaluate)))
        return sorted(random.Random(f"{cfg.seed}-{rnd}-evaluate").sample(nodes, k))

    def state_for(self, partition: int | None, global_state: Tensors, memory: ServerMemory) -> Tensors:
        """What a node is sent (to train from, and to evaluate)."""
        return global_state

    def min_replies(self, cfg: FederationConfig) -> int:
        return cfg.min_train_clients

    def combine(
        self, combiner: Average, reference: Tensors, updates: list[Update], cfg: FederationConfig, memory: ServerMemory
    ) -> Tensors | None:
        """The next global state (None: keep the current one)."""
        return combiner(reference, [u.theta for u in updates], [u.fisher for u in updates], [u.examples for u in updates], cfg, memory)

    def evaluate(
        self, part: Any, side: ServerSide, global_state: Tensors, memory: ServerMemory, validation: bool = False
    ) -> tuple[dict[str, float], dict[str, dict]]:
        """(global-test report, per-client global-test reports where clients keep their own state); on the
        validation set instead of the global test set when `validation`."""
        part.load(global_state)
        return side.evaluate(part.endpoint(), validation=validation), {}

    # --- the client ------------------------------------------------------------------
    def client_work(self, job: ClientJob) -> tuple[list[Sample], TrainConfig]:
        """The samples a client trains on this round, and for how many steps."""
        return job.data.train, job.cfg.train

    def local_steps(self, cfg: RunConfig) -> int:
        return cfg.train.local_steps


@dataclass(frozen=True)
class Local(Federated):
    """Each client trains its own adapters only; nothing is merged, each is sent back its own."""

    kind = "local"
    personal_models = True  # no global model: each client's own adapters, in the server's checkpoint

    def state_for(self, partition: int | None, global_state: Tensors, memory: ServerMemory) -> Tensors:
        own = memory.clients.get(partition) if partition is not None else None
        return own if own is not None else global_state

    def min_replies(self, cfg: FederationConfig) -> int:
        return 1

    def combine(
        self, combiner: Average, reference: Tensors, updates: list[Update], cfg: FederationConfig, memory: ServerMemory
    ) -> Tensors | None:
        for u in updates:
            memory.clients[u.partition] = u.theta
        return None

    def evaluate(
        self, part: Any, side: ServerSide, global_state: Tensors, memory: ServerMemory, validation: bool = False
    ) -> tuple[dict[str, float], dict[str, dict]]:
        """No global model: each client's own adapters on the global test (or validation) set, and their mean."""
        per_client = {}
        for pid, state in sorted(memory.clients.items()):
            part.load(state)
            per_client[str(pid)] = side.evaluate(part.endpoint(), f"global evaluation, client {pid}", validation)
        if not per_client:
            return super().evaluate(part, side, global_state, memory, validation)
        return merge_reports(list(per_client.values())), per_client


@dataclass(frozen=True)
class Centralized(Federated):
    """One trainer holds every client's data and takes the federation's total steps per round."""

    kind = "centralized"
    pools_data = True  # the server trains on every client's data

    def sample(self, nodes: list[int], rnd: int, cfg: FederationConfig, poisson: random.Random | None = None) -> list[int]:
        return sorted(nodes)[:1]

    def min_replies(self, cfg: FederationConfig) -> int:
        return 1

    def client_work(self, job: ClientJob) -> tuple[list[Sample], TrainConfig]:
        cfg = job.cfg
        samples = [s for part in partitions(cfg) for s in part.train]
        return samples, replace(cfg.train, local_steps=self.local_steps(cfg))

    def local_steps(self, cfg: RunConfig) -> int:
        return cfg.train.local_steps * cfg.data.num_clients

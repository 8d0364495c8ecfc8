"""What FedNano's family trains: the two NanoAdapters of each client's NanoEdge, through the
split channel; the server keeps its own copy to start the federation and to evaluate it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fednano.client.dp_sgd import DPSGD
from fednano.client.training import StepHook, train_local
from fednano.config import TrainConfig
from fednano.data.samples import Sample
from fednano.runtime.client import ClientJob, ClientRuntime
from fednano.runtime.server import ServerSide
from fednano.split.endpoint import LLMEndpoint

T = TypeVar("T")


@dataclass(frozen=True)
class NanoAdapters:
    """frozen_a (FedNano-FFA, after FFA-LoRA): each adapter's A stays at the shared seeded initialisation;
    only B trains, is uploaded and is merged, so merging is exact in the product B A and the upload halves."""

    frozen_a: bool = False
    personal = False
    in_llm = False  # what trains sits on the client's NanoEdge, outside the LLM

    @property
    def kind(self) -> str:
        return "nanoedge-ffa" if self.frozen_a else "nanoedge"

    def shared(self, state: Mapping[str, T]) -> dict[str, T]:
        """What of a state a client trains and uploads (and the server merges)."""
        return {k: v for k, v in state.items() if not (self.frozen_a and k.endswith(".A.weight"))}

    def client(self, rt: ClientRuntime) -> NanoAdapterClient:
        return NanoAdapterClient(rt, self)

    def server(self, side: ServerSide) -> NanoAdapterServer:
        return NanoAdapterServer(side)


class NanoAdapterClient:
    def __init__(self, rt: ClientRuntime, trains: NanoAdapters) -> None:
        self.rt, self.trains = rt, trains

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.rt.edge.load_adapter_state(state)

    def train(
        self, job: ClientJob, samples: list[Sample], cfg: TrainConfig, hooks: Sequence[StepHook]
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        rt = self.rt
        params = self.trains.shared(rt.edge.adapter_parameters())  # FFA: the optimiser never sees A
        dp = (DPSGD.of(job.cfg, len(samples), cfg, rt.edge.device, job.noise_seed("dp-sgd"), job.noise_seed("dp-sgd-batches"))
              if job.cfg.privacy.dp_sgd else None)
        loss = train_local(rt.edge, rt.split, samples, rt.work, cfg, job.generator, params=params, hooks=hooks, dp=dp)
        return loss, rt.edge.adapter_state(), dp.report(cfg.local_steps) if dp else {}

    def endpoint(self, job: ClientJob) -> LLMEndpoint:
        return self.rt.split


class NanoAdapterServer:
    def __init__(self, side: ServerSide) -> None:
        self.side = side

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The round-0 global adapters, from federation.seed (B = 0: the identity)."""
        edge = self.side.edge
        gen = torch.Generator().manual_seed(self.side.cfg.federation.seed)
        edge.adapter_i.reset_parameters(gen)
        edge.adapter_t.reset_parameters(gen)
        return edge.adapter_state()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.side.edge.load_adapter_state(state)

    def endpoint(self) -> LLMEndpoint:
        return self.side.endpoint

    def client_parameters(self) -> int:
        """What one client holds: its NanoEdge."""
        return self.side.edge_parameters()

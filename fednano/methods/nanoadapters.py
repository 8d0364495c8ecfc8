"""What FedNano's family trains: the two NanoAdapters of each client's NanoEdge, through the
split channel; the server keeps its own copy to start the federation and to evaluate it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fednano.client.training import StepHook, train_local
from fednano.config import TrainConfig
from fednano.data.samples import Sample
from fednano.runtime.client import ClientJob, ClientRuntime
from fednano.runtime.server import ServerSide
from fednano.split.endpoint import LLMEndpoint


@dataclass(frozen=True)
class NanoAdapters:
    kind = "nanoedge"
    personal = False
    in_llm = False  # what trains sits on the client's NanoEdge, outside the LLM

    def client(self, rt: ClientRuntime) -> NanoAdapterClient:
        return NanoAdapterClient(rt)

    def server(self, side: ServerSide) -> NanoAdapterServer:
        return NanoAdapterServer(side)


class NanoAdapterClient:
    def __init__(self, rt: ClientRuntime) -> None:
        self.rt = rt

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.rt.edge.load_adapter_state(state)

    def train(
        self, job: ClientJob, samples: list[Sample], cfg: TrainConfig, hooks: Sequence[StepHook]
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        rt = self.rt
        loss = train_local(rt.edge, rt.split, samples, rt.work, cfg, job.generator, hooks=hooks)
        return loss, rt.edge.adapter_state(), {}

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

"""How the server combines the replies it accepted into the next global state (pure maths in
aggregation.py), and what it remembers across rounds for that (checkpointed with every round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fednano.aggregation import fedavg, fisher_merge, server_opt_step
from fednano.config import FederationConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class ServerMemory:
    """What the server keeps across rounds: server-optimiser moments, each client's own adapters
    (methods that merge nothing). All of it goes into the round's checkpoint."""

    opt: Tensors = field(default_factory=dict)
    clients: dict[int, Tensors] = field(default_factory=dict)  # partition -> its adapters

    def state_dict(self) -> Tensors:
        out = {f"opt.{k}": v for k, v in self.opt.items()}
        for pid, st in self.clients.items():
            out.update({f"client.{pid}.{k}": v for k, v in st.items()})
        return out

    def load_state_dict(self, state: Tensors) -> None:
        self.opt = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        self.clients = {}
        for k, v in state.items():
            if k.startswith("client."):
                _, pid, name = k.split(".", 2)
                self.clients.setdefault(int(pid), {})[name] = v


@dataclass(frozen=True)
class Average:
    """FedAvg: theta = sum_k n_k theta_k / sum_k n_k."""

    server_opt = ""

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        return fedavg(thetas, counts)


@dataclass(frozen=True)
class FisherMerge(Average):
    """Fisher merging: theta = sum_k n_k F_k theta_k / sum_k n_k F_k (element-wise)."""

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        if any(f is None for f in fishers):
            raise ValueError("Fisher merging needs every client's Fisher")
        return fisher_merge(thetas, [f for f in fishers if f is not None], counts, floor=cfg.fisher_floor, normalize=cfg.fisher_normalize)


@dataclass(frozen=True)
class ServerOptimiser(Average):
    """FedOpt: FedAvg, then a server Adam / Yogi step on the averaged update (moments in memory)."""

    server_opt: str = "adam"

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        merged = fedavg(thetas, counts)
        merged, memory.opt = server_opt_step(self.server_opt, reference, merged, memory.opt, lr=cfg.server_lr, beta1=cfg.server_beta1,
                                             beta2=cfg.server_beta2, tau=cfg.server_tau)
        return merged

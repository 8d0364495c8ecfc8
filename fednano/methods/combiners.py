"""How the server combines the replies it accepted into the next global state (pure maths in
aggregation.py), and what it remembers across rounds for that (checkpointed with every round)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fednano.aggregation import (
    dp_fedavg,
    dp_fisher_merge,
    fedavg,
    fisher_merge,
    fisher_prior_merge,
    low_rank_factors,
    merge_weights,
    product_merge,
    server_opt_step,
)
from fednano.config import FederationConfig
from fednano.privacy import noise_seed, secret_rng

Tensors = dict[str, torch.Tensor]
PRIOR_ROUNDS = "rounds"  # ServerMemory.prior's round count (its other keys are adapter names, which all contain a dot)


@dataclass
class ServerMemory:
    """What the server keeps across rounds: server-optimiser moments, each client's own adapters
    (methods that merge nothing). All of it goes into the round's checkpoint."""

    opt: Tensors = field(default_factory=dict)
    clients: dict[int, Tensors] = field(default_factory=dict)  # partition -> its adapters
    prior: Tensors = field(default_factory=dict)  # federation.fisher_prior: the running mean merge weight, and its round count

    def state_dict(self) -> Tensors:
        out = {f"opt.{k}": v for k, v in self.opt.items()} | {f"prior.{k}": v for k, v in self.prior.items()}
        for pid, st in self.clients.items():
            out.update({f"client.{pid}.{k}": v for k, v in st.items()})
        return out

    def load_state_dict(self, state: Tensors) -> None:
        self.opt = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        self.prior = {k[6:]: v for k, v in state.items() if k.startswith("prior.")}
        self.clients = {}
        for k, v in state.items():
            if k.startswith("client."):
                _, pid, name = k.split(".", 2)
                self.clients.setdefault(int(pid), {})[name] = v


@dataclass(frozen=True)
class Average:
    """FedAvg: theta = sum_k n_k theta_k / sum_k n_k."""

    kind = "average"
    server_opt = ""

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        return fedavg(thetas, counts)


@dataclass(frozen=True)
class FisherMerge(Average):
    """Fisher merging: theta = sum_k n_k F_k theta_k / sum_k n_k F_k (element-wise)."""

    kind = "fisher"

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        if any(f is None for f in fishers):
            raise ValueError("Fisher merging needs every client's Fisher")
        weights = merge_weights([f for f in fishers if f is not None], counts, cfg.fisher_floor, cfg.fisher_normalize, cfg.fisher_power)
        if not cfg.fisher_prior:
            return fisher_merge(thetas, [f for f in fishers if f is not None], counts, floor=cfg.fisher_floor,
                                normalize=cfg.fisher_normalize, power=cfg.fisher_power)
        shared = {k: reference[k] for k in thetas[0]}
        n_total = float(sum(counts))
        seen = memory.prior.pop(PRIOR_ROUNDS, None)
        merged = fisher_prior_merge(shared, thetas, weights, n_total, memory.prior if seen is not None else None, cfg.fisher_prior)
        rounds = 0.0 if seen is None else float(seen)
        for k in shared:  # the running mean, over rounds, of this round's mean per-example weight (after the merge: a prior
            mean = torch.stack([w[k] for w in weights]).sum(0) / n_total  # is what earlier rounds knew)
            memory.prior[k] = mean if seen is None else (memory.prior[k].double() * rounds + mean) / (rounds + 1)
        memory.prior[PRIOR_ROUNDS] = torch.tensor(rounds + 1, dtype=torch.float64)
        return merged


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


@dataclass(frozen=True)
class ProductMerge(Average):
    """FedNano-product: Fisher merging in the space of each adapter's product B A (what the adapter applies;
    the product of averaged factors is not the average of products). The importance of the product's entry
    (i, j) is a Kronecker-factored diagonal: the Fisher of B summed over the rank (row i's) times the Fisher
    of A summed over the rank (column j's), from the Fisher FedNano already sends. The merged product is
    re-factorised to rank r by a truncated SVD (as FlexLoRA does for plain averaging)."""

    kind = "fisher-product"

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        if any(f is None for f in fishers):
            raise ValueError("product merging needs every client's Fisher")
        out: Tensors = {}
        for a in (k for k in reference if k.endswith(".A.weight")):
            b = a[: -len("A.weight")] + "B.weight"
            rows = [f[b].double().sum(1) for f in fishers if f is not None]  # (d_out,)
            cols = [f[a].double().sum(0) for f in fishers if f is not None]  # (d_in,)
            if cfg.fisher_normalize:  # each client's importance to mean 1
                rows, cols = [r / r.mean().clamp(min=1e-30) for r in rows], [c / c.mean().clamp(min=1e-30) for c in cols]
            merged = product_merge([t[b].double() @ t[a].double() for t in thetas], rows, cols, counts, floor=cfg.fisher_floor)
            out[a], out[b] = (x.to(reference[a].dtype) for x in low_rank_factors(merged, reference[a].shape[0], reference[a]))
        return out


def state_seeded(reference: Tensors, reproducible: bool = False) -> torch.Generator:
    """The server's privacy-noise generator, on the state's device. Its seed is 63 bits of OS entropy that never leave
    this call (not sent, logged or checkpointed): no client, nor anyone who sees the published model, can redraw the noise
    and subtract it. Only under privacy.reproducible_noise (tests; the run is marked not private) is it seeded by the
    state's bytes, so that the same state draws the same noise."""
    device = next(iter(reference.values())).device
    if not reproducible:
        return torch.Generator(device=device).manual_seed(noise_seed(False))
    digest = hashlib.sha256(b"".join(reference[k].detach().cpu().contiguous().numpy().tobytes() for k in sorted(reference)))
    return torch.Generator(device=device).manual_seed(int(digest.hexdigest()[:15], 16))


@dataclass(frozen=True)
class ClientDP(Average):
    """privacy.client_dp around a FedAvg-family combiner: DP-FedAvg (clipped updates, Gaussian noise on their sum, a
    fixed denominator: the expected clients q N of Poisson sampling), then the inner combiner's server optimiser, if any,
    on the noised average (post-processing). Every round releases, whatever number of clients took part (none: the noise
    alone): skipping a round with few replies would tell whoever sees the model how many took part.

    The noise is fresh OS entropy every call (state_seeded), on resume too: no seed is kept, not even in the server's
    checkpoint. ε stays right: every release is counted before it leaves the server, in a file resuming never rolls back
    (federation/accounts.py, PrivacyAccounts), so a round cut short and run again from the checkpoint counts twice.
    `reproducible` (privacy.reproducible_noise, tests only) seeds the noise by the starting state."""

    kind = "dp-average"
    inner: Average = Average()
    clip: float = 1.0
    noise_multiplier: float = 1.0
    expected_clients: float = 1.0
    reproducible: bool = False

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        merged = dp_fedavg(reference, thetas, self.clip, self.noise_multiplier, self.expected_clients,
                           state_seeded(reference, self.reproducible))
        if self.inner.server_opt:
            merged, memory.opt = server_opt_step(self.inner.server_opt, reference, merged, memory.opt, lr=cfg.server_lr,
                                                 beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau)
        return merged

    def sampler(self, seed: int, rnd: int) -> random.Random:
        """Where round `rnd`'s Poisson client sampling draws from (Federated.sample): OS entropy, or seeded by (seed, rnd)."""
        return secret_rng(self.reproducible, seed, rnd, "clients")


@dataclass(frozen=True)
class ClientDPFisher(Average):
    """privacy.client_dp for Fisher merging: each client's Fisher reduced to a few group weights (per tensor, or per
    rank component with privacy.fisher_groups = "rank"), the weighted updates and the weights summed with Gaussian noise
    on both (aggregation.dp_fisher_merge; its accountant sees noise_multiplier / sqrt(2)). Sampled, released, noised and
    resumed as ClientDP is."""

    kind = "dp-fisher"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    expected_clients: float = 1.0
    by_rank: bool = False
    reproducible: bool = False

    def __call__(self, reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors | None], counts: Sequence[float],
                 cfg: FederationConfig, memory: ServerMemory) -> Tensors:
        if any(f is None for f in fishers):
            raise ValueError("Fisher merging needs every client's Fisher")
        return dp_fisher_merge(reference, thetas, [f for f in fishers if f is not None], self.clip, self.noise_multiplier,
                               self.expected_clients, state_seeded(reference, self.reproducible), by_rank=self.by_rank)

    def sampler(self, seed: int, rnd: int) -> random.Random:
        return secret_rng(self.reproducible, seed, rnd, "clients")

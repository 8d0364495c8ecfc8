"""Server-side merging of client adapters: pure functions on name -> tensor dicts.

    fedavg:       theta = sum_k n_k theta_k / sum_k n_k
    fisher_merge: theta = sum_k n_k F_k theta_k / sum_k n_k F_k     (element-wise)

FedAvg on the same NanoAdapters is exactly "FedNano without Fisher".
`validate_update` is the gate every client reply passes before it is merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]


def fedavg(thetas: Sequence[Tensors], n_examples: Sequence[float]) -> Tensors:
    if not thetas or len(thetas) != len(n_examples):
        raise ValueError("fedavg needs one example count per client and at least one client")
    total = float(sum(n_examples))
    if total <= 0:
        raise ValueError("total number of examples must be positive")
    return {k: sum(float(n) * t[k].double() for t, n in zip(thetas, n_examples, strict=True)).div(total).to(thetas[0][k].dtype) for k in thetas[0]}


def normalize_fisher(fisher: Tensors) -> Tensors:
    """Scale a client's Fisher to mean 1 over all its entries (so no client dominates by scale)."""
    total = sum(float(v.double().sum()) for v in fisher.values())
    count = sum(v.numel() for v in fisher.values())
    mean = total / count if count else 0.0
    return {k: v / mean for k, v in fisher.items()} if mean > 0 else dict(fisher)


def fisher_merge(
    thetas: Sequence[Tensors], fishers: Sequence[Tensors], n_examples: Sequence[float], floor: float = 1e-6, normalize: bool = False
) -> Tensors:
    """Element-wise Fisher-weighted average; F is floored so the merge is always defined."""
    if not thetas or not (len(thetas) == len(fishers) == len(n_examples)):
        raise ValueError("fisher_merge needs one Fisher and one example count per client")
    if normalize:
        fishers = [normalize_fisher(f) for f in fishers]
    out = {}
    for k in thetas[0]:
        num = torch.zeros_like(thetas[0][k], dtype=torch.float64)
        den = torch.zeros_like(num)
        for t, f, n in zip(thetas, fishers, n_examples, strict=True):
            w = float(n) * f[k].double().clamp(min=floor)
            num += w * t[k].double()
            den += w
        out[k] = (num / den).to(thetas[0][k].dtype)
    return out


def update_norm(reference: Tensors, theta: Tensors) -> float:
    """L2 norm of theta - reference over all tensors."""
    return math.sqrt(sum(float((theta[k].double() - reference[k].double()).pow(2).sum()) for k in reference))


def validate_update(reference: Tensors, theta: Tensors, fisher: Tensors | None, n_examples: float, max_norm: float = 0.0) -> list[str]:
    """Reasons to reject a client's reply (empty list = accept); max_norm > 0 bounds ||theta - reference||."""
    problems = []
    if not (isinstance(n_examples, (int, float)) and math.isfinite(n_examples) and n_examples > 0):
        problems.append(f"num-examples must be a positive number, got {n_examples!r}")
    for what, tensors in (("adapters", theta), ("fisher", fisher)):
        if tensors is None:
            continue
        if set(tensors) != set(reference):
            problems.append(f"{what}: keys {sorted(tensors)} != expected {sorted(reference)}")
            continue
        for k, ref in reference.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(ref.shape):
                problems.append(f"{what}.{k}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}")
            elif not torch.isfinite(t).all():
                problems.append(f"{what}.{k}: contains NaN or Inf")
            elif what == "fisher" and (t < 0).any():
                problems.append(f"{what}.{k}: negative entries")
    if max_norm > 0 and not problems:
        norm = update_norm(reference, theta)
        if norm > max_norm:
            problems.append(f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm:g}")
    return problems


Merge = Callable[..., Tensors]


def _merge_fisher(thetas: Sequence[Tensors], fishers: Sequence[Tensors], n: Sequence[float], *, floor: float, normalize: bool) -> Tensors:
    return fisher_merge(thetas, fishers, n, floor=floor, normalize=normalize)


def _merge_fedavg(thetas: Sequence[Tensors], fishers: Sequence[Tensors], n: Sequence[float], *, floor: float, normalize: bool) -> Tensors:
    return fedavg(thetas, n)


@dataclass(frozen=True)
class Method:
    """One federated method: what the client computes, how the server merges.

    fisher: "none"; "pass" (an extra pass after local training, FedNano);
            "training" (squared gradients accumulated during local training, FedNano-EF)
    proximal: the client adds mu/2 ||theta - theta_global||^2 to its loss (FedProx)
    """

    fisher: str
    merge: Merge
    proximal: bool = False

    @property
    def wants_fisher(self) -> bool:
        return self.fisher != "none"


# One registry entry per method.
STRATEGIES: dict[str, Method] = {
    "fednano": Method("pass", _merge_fisher),
    "fednano-ef": Method("training", _merge_fisher),
    "fedavg": Method("none", _merge_fedavg),
    "fedprox": Method("none", _merge_fedavg, proximal=True),
}


def proximal_term(params: Tensors, anchor: Tensors, mu: float) -> torch.Tensor:
    """FedProx's mu/2 * sum_k ||p_k - anchor_k||^2 (its gradient is mu * (p - anchor))."""
    return 0.5 * mu * sum(((params[k] - anchor[k].to(params[k].dtype)) ** 2).sum() for k in params)

"""Diagonal Fisher information of the NanoAdapter parameters.

    empirical: F = (1/N) sum_i (d log p(y_i | x_i) / d theta)^2            (true answers y_i)
    exact:     F = (1/N) sum_i sum_c p(c | x_i) (d log p(c | x_i) / d theta)^2
               over the answer candidates c, p the model's own answer distribution
               (Matena & Raffel's Fisher merging, restricted to the closed answer set)

Per-sample gradients come cheaply through the split: the server differentiates
the *summed* NLL, whose gradient w.r.t. sample i's embeddings is sample i's own
(samples do not interact in a causal LM batch); the client then back-propagates
each sample's embedding-gradient into its adapters separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # training.py imports this module's pure functions
    from fednano.data.prompts import TokenBatch
    from fednano.models.nanoedge import NanoEdge
    from fednano.training import LLMEndpoint


def accumulate_squared(acc: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """acc[k] += weight * grads[k]**2 (in place)."""
    for k, g in grads.items():
        acc[k] += weight * g.detach() ** 2


def candidate_distribution(log_likelihoods: torch.Tensor, n_valid: int = 0) -> torch.Tensor:
    """p(c | x) over the answer candidates from their sequence log-likelihoods (K,);
    n_valid > 0: only the first n_valid candidates are possible (multiple choice)."""
    lp = log_likelihoods.double().clone()
    if n_valid:
        lp[n_valid:] = float("-inf")
    return torch.softmax(lp, -1)


def mean_fisher(acc: dict[str, torch.Tensor], n: float) -> dict[str, torch.Tensor]:
    if n <= 0:
        raise ValueError("Fisher needs at least one sample")
    return {k: v / n for k, v in acc.items()}


def empirical_fisher(
    edge: NanoEdge, endpoint: LLMEndpoint, data: Iterable[tuple[TokenBatch, torch.Tensor]] | Iterable[tuple[TokenBatch, torch.Tensor, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], float]:
    """Diagonal Fisher over the batches in `data` -> (Fisher per parameter, samples).

    Items are (batch, features) - every row one sample at its true answer (empirical
    Fisher) - or (batch, features, weights): row r carries weight p_r, and a sample's
    rows (one per candidate answer) have weights summing to 1 (exact Fisher).
    """
    params = edge.adapter_parameters()
    names, tensors = list(params), list(params.values())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0.0
    edge.eval()
    for batch, feats, *rest in data:
        weights = rest[0] if rest else torch.ones(batch.input_ids.shape[0])
        embeds = edge.embed(batch.input_ids, feats)  # (B, T, d)
        _, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels, reduction="sum")
        for i in range(embeds.shape[0]):
            gs = torch.autograd.grad(embeds[i], tensors, grad_outputs=grad[i], retain_graph=True, allow_unused=True)
            accumulate_squared(acc, {k: (g if g is not None else torch.zeros_like(p)) for k, g, p in zip(names, gs, tensors, strict=True)}, float(weights[i]))
            n += float(weights[i])
    return mean_fisher(acc, n), n

"""Diagonal Fisher information of the NanoAdapter parameters.

    F = (1/N) sum_i (d log p(y_i | x_i) / d theta)^2      (empirical Fisher, true labels)

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


def accumulate_squared(acc: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """acc[k] += grads[k]**2 (in place)."""
    for k, g in grads.items():
        acc[k] += g.detach() ** 2


def mean_fisher(acc: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    if n <= 0:
        raise ValueError("Fisher needs at least one sample")
    return {k: v / n for k, v in acc.items()}


def empirical_fisher(edge: NanoEdge, endpoint: LLMEndpoint, data: Iterable[tuple[TokenBatch, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher over the batches in `data` -> (Fisher per parameter, samples)."""
    params = edge.adapter_parameters()
    names, tensors = list(params), list(params.values())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0
    edge.eval()
    for batch, feats in data:
        embeds = edge.embed(batch.input_ids, feats)  # (B, T, d)
        _, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels, reduction="sum")
        for i in range(embeds.shape[0]):
            gs = torch.autograd.grad(embeds[i], tensors, grad_outputs=grad[i], retain_graph=True, allow_unused=True)
            accumulate_squared(acc, {k: (g if g is not None else torch.zeros_like(p)) for k, g, p in zip(names, gs, tensors, strict=True)})
            n += 1
    return mean_fisher(acc, n), n

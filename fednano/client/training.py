"""Local training on the client: the split step, shuffled batches, and the AdamW loop.

Each split step is explicit:

    embeds = edge.embed(ids, features)                       # client forward (graph kept)
    loss, grad = endpoint.train_step(embeds, mask, labels)   # server: the frozen LLM
    embeds.backward(grad)                                    # client backward into the adapters

What a method adds to a step (FedProx's proximal term, FedNano-EF's Fisher) is a hook that
runs after the backward and before the optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from fednano.aggregation import proximal_term
from fednano.client.dp_sgd import DPSGD, poisson_batches
from fednano.client.features import Workload
from fednano.client.nanoedge import NanoEdge
from fednano.config import TrainConfig
from fednano.data.prompts import TokenBatch
from fednano.data.samples import Sample
from fednano.split.endpoint import LLMEndpoint


class StepHook(Protocol):
    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        """Runs once per step, after the LLM loss's backward, before the optimiser step."""
        ...


class Proximal:
    """FedProx: adds the gradient of mu/2 ||theta - anchor||^2 (on the client, no extra traffic)."""

    def __init__(self, anchor: dict[str, torch.Tensor], mu: float) -> None:
        self.anchor, self.mu = anchor, mu

    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        proximal_term(params, self.anchor, self.mu).backward()


def split_step(edge: NanoEdge, endpoint: LLMEndpoint, batch: TokenBatch, features: torch.Tensor | None) -> float:
    """One split-learning step: client forward, server LLM, client backward. Returns the loss."""
    embeds = edge.embed(batch.input_ids, features)  # (B, T, d)
    loss, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels, parts=edge.parts(batch.input_ids, features))
    # (an in-process LoRA endpoint has already back-propagated into its own parameters; a parts protocol's
    # server into the adapters it applied, leaving zero gradient at their positions)
    if embeds.requires_grad:
        embeds.backward(grad.to(embeds.device, embeds.dtype))
    return float(loss)  # one host synchronisation per step


def batches(samples: list[Sample], batch_size: int, generator: torch.Generator) -> Iterator[list[Sample]]:
    """Endless shuffled mini-batches (a fresh permutation per pass)."""
    n = len(samples)
    if n == 0:
        raise ValueError("no training samples")
    bs = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - bs + 1, bs):  # drop the ragged tail of each pass
            yield [samples[j] for j in order[i : i + bs]]


def train_local(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, cfg: TrainConfig, generator: torch.Generator, *,
    params: dict[str, nn.Parameter] | None = None, hooks: Sequence[StepHook] = (), on_step: Callable[[int, float], None] | None = None,
    dp: DPSGD | None = None,
) -> float:
    """`cfg.local_steps` AdamW steps; returns the mean training loss.

    params: what trains (default: the NanoAdapters; the whole-LLM baselines pass their LoRA).
    hooks: run in order after each step's backward (a Fisher from the training gradients must
    come before a proximal term, which changes the gradients; under DP-SGD they see the noised gradient).
    dp: DP-SGD (privacy.dp_sgd): Poisson-sampled batches, per-sample clipping and noise (client/dp_sgd.py).
    """
    named = params if params is not None else edge.adapter_parameters()
    opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    edge.train()
    losses = []
    stream = poisson_batches(samples, dp.rate, dp.sampler or generator) if dp else batches(samples, cfg.batch_size, generator)
    for step in range(cfg.local_steps):
        chosen = next(stream)
        opt.zero_grad(set_to_none=True)
        if dp is None:
            loss: float | None = split_step(edge, endpoint, *work.train_batch(chosen))
        else:
            loss = dp.step(edge, endpoint, work.train_batch(chosen) if chosen else None, named)
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at local step {step}")
        for hook in hooks:
            hook.after_backward(named)
        opt.step()
        if loss is not None:  # (an empty Poisson batch has none)
            losses.append(loss)
            if on_step:
                on_step(step, loss)
    edge.eval()
    return sum(losses) / len(losses) if losses else math.nan

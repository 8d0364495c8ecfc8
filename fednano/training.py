"""Client-side work against an LLM endpoint: local training, Fisher batches, evaluation.

An endpoint is anything with ServerLLM's `train_step` / `score`: the remote
SplitClient (clients), or the ServerLLM itself (the server's own evaluation and
connector pre-training). Each split step is explicit:

    embeds = edge.embed(ids, features)                 # client forward (graph kept)
    loss, grad = endpoint.train_step(embeds, mask, labels)   # server: frozen LLM
    embeds.backward(grad)                              # client backward into the adapters
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fednano.config import TrainConfig
from fednano.data.easyvqa import Sample, load_image
from fednano.data.prompts import TokenBatch, candidate_batch, prompt_batch, training_batch
from fednano.models.nanoedge import NanoEdge
from fednano.models.vision import VisionEncoder


class LLMEndpoint(Protocol):
    def train_step(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def score(self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor: ...


class ImageFeatures:
    """Frozen-encoder outputs per image, computed once (the encoder never changes)."""

    def __init__(self, encoder: VisionEncoder, chunk: int = 32) -> None:
        self.encoder, self.chunk = encoder, chunk
        self._memo: dict[str, torch.Tensor] = {}

    def __call__(self, paths: list[str]) -> torch.Tensor:  # -> (M, N, C)
        todo = [p for p in dict.fromkeys(paths) if p not in self._memo]
        for i in range(0, len(todo), self.chunk):
            part = todo[i : i + self.chunk]
            feats = self.encoder(torch.stack([load_image(p) for p in part]))
            self._memo.update(zip(part, feats, strict=True))
        return torch.stack([self._memo[p] for p in paths])


@dataclass
class Workload:
    """What the client needs besides its NanoEdge to turn samples into batches."""

    tokenizer: Any
    features: ImageFeatures
    n_visual: int

    def train_batch(self, samples: list[Sample]) -> tuple[TokenBatch, torch.Tensor]:
        batch = training_batch(self.tokenizer, [s.question for s in samples], [s.answer for s in samples], self.n_visual)
        return batch, self.features([s.image_path for s in samples])


def split_step(edge: NanoEdge, endpoint: LLMEndpoint, batch: TokenBatch, features: torch.Tensor) -> float:
    """One split-learning step: client forward, server LLM, client backward. Returns the loss."""
    embeds = edge.embed(batch.input_ids, features)  # (B, T, d)
    loss, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels)
    embeds.backward(grad)
    return float(loss)


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
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    samples: list[Sample],
    work: Workload,
    cfg: TrainConfig,
    generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """`cfg.local_steps` AdamW steps on the NanoAdapters; returns the mean training loss."""
    params = list(edge.adapter_parameters().values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    edge.train()
    losses = []
    stream = batches(samples, cfg.batch_size, generator)
    for step in range(cfg.local_steps):
        batch, feats = work.train_batch(next(stream))
        opt.zero_grad(set_to_none=True)
        loss = split_step(edge, endpoint, batch, feats)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite training loss at local step {step}")
        opt.step()
        losses.append(loss)
        if on_step:
            on_step(step, loss)
    edge.eval()
    return {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}


@torch.no_grad()
def evaluate(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, answers: list[str], batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Closed-set accuracy: the answer with the highest log-likelihood is the prediction."""
    edge.eval()
    cand = candidate_batch(work.tokenizer, answers)
    cand_embeds = edge.embed(cand.input_ids, None)  # (K, L, d): candidates pass NanoAdapter-T too
    index = {a: i for i, a in enumerate(answers)}
    correct = 0
    for i in range(0, len(samples), batch_size):
        part = samples[i : i + batch_size]
        batch = prompt_batch(work.tokenizer, [s.question for s in part], work.n_visual)
        embeds = edge.embed(batch.input_ids, work.features([s.image_path for s in part]))
        lp = endpoint.score(embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask)  # (B, K)
        pred = lp.argmax(-1).tolist()
        correct += sum(int(p == index[s.answer]) for p, s in zip(pred, part, strict=True))
        if on_batch:
            on_batch(len(part))
    return {"accuracy": correct / max(1, len(samples)), "num_examples": float(len(samples))}

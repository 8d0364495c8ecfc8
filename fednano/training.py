"""Client-side work against an LLM endpoint: local training, Fisher batches, evaluation.

An endpoint is anything with ServerLLM's `train_step` / `score`: the remote
SplitClient (clients), or the ServerLLM itself (the server's own evaluation and
connector pre-training). Each split step is explicit:

    embeds = edge.embed(ids, features)                 # client forward (graph kept)
    loss, grad = endpoint.train_step(embeds, mask, labels)   # server: frozen LLM
    embeds.backward(grad)                              # client backward into the adapters
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fednano.aggregation import proximal_term
from fednano.config import TrainConfig
from fednano.data.easyvqa import SYSTEM_PROMPT
from fednano.data.prompts import TokenBatch, candidate_batch, prompt_batch, training_batch
from fednano.data.samples import Sample, load_image
from fednano.devices import module_device
from fednano.fisher import accumulate_squared, candidate_distribution, mean_fisher
from fednano.metrics import accuracy_report
from fednano.models.nanoedge import NanoEdge
from fednano.models.vision import VisionEncoder


class LLMEndpoint(Protocol):
    def train_step(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def score(self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor: ...


class ImageFeatures:
    """Frozen-encoder outputs per image, computed once (the encoder never changes).

    Each image is resized and encoded on its own. Batching images would make an image's
    features depend on what it was batched with: the encoder's CPU kernels change with the
    batch size (one thread: batches of 16 differ from smaller ones in the last bits), and
    which images a client process encodes together depends on which clients it served
    before, so same-seed runs parted ways. One image at a time is also the fastest here, on
    one thread and on two (`benchmarks/image_features.py`), and a request may mix image
    sizes (ScienceQA, IconQA and LLaVA-style data do).
    """

    def __init__(self, encoder: VisionEncoder) -> None:
        self.encoder = encoder
        self._memo: dict[str, torch.Tensor] = {}  # path -> (N, C) on the encoder's device

    @torch.no_grad()
    def __call__(self, paths: list[str]) -> torch.Tensor:  # -> (M, N, C)
        device = module_device(self.encoder)
        for p in dict.fromkeys(paths):
            if p not in self._memo:  # decoded on the CPU (PIL), encoded where the encoder lives
                self._memo[p] = self.encoder.features(self.encoder.preprocess(load_image(p).unsqueeze(0).to(device)))[0]
        return torch.stack([self._memo[p] for p in paths])


@dataclass
class Workload:
    """What the client needs besides its NanoEdge to turn samples into batches."""

    tokenizer: Any
    features: ImageFeatures
    n_visual: int
    system: str = SYSTEM_PROMPT

    def images(self, samples: list[Sample]) -> torch.Tensor | None:
        """Encoder features of every image of the batch, in order (None: text-only batch)."""
        paths = [p for s in samples for p in s.images]
        return self.features(paths) if paths else None

    def train_batch(self, samples: list[Sample]) -> tuple[TokenBatch, torch.Tensor | None]:
        batch = training_batch(self.tokenizer, [s.content() for s in samples], [s.answer for s in samples], self.n_visual, self.system)
        return batch, self.images(samples)


def split_step(edge: NanoEdge, endpoint: LLMEndpoint, batch: TokenBatch, features: torch.Tensor) -> float:
    """One split-learning step: client forward, server LLM, client backward. Returns the loss."""
    embeds = edge.embed(batch.input_ids, features)  # (B, T, d)
    loss, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels)
    if embeds.requires_grad:  # (an in-process LoRA endpoint has already back-propagated into its own parameters)
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
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    samples: list[Sample],
    work: Workload,
    cfg: TrainConfig,
    generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    accumulate_fisher: bool = False,
    params: dict[str, torch.nn.Parameter] | None = None,
) -> dict:
    """`cfg.local_steps` AdamW steps on the NanoAdapters; returns the mean training loss.

    proximal_mu > 0 (FedProx): adds mu/2 ||theta - anchor||^2 on the client, no extra traffic.
    accumulate_fisher (FedNano-EF): also returns "fisher", the mean over steps of the squared
    adapter gradients of the training loss: no extra pass, nothing extra sent per step.
    params: what trains (default: the NanoAdapters; the full-MLLM baselines pass their LoRA).
    """
    named = params if params is not None else edge.adapter_parameters()
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fisher = {k: torch.zeros_like(p) for k, p in named.items()} if accumulate_fisher else None
    edge.train()
    losses = []
    stream = batches(samples, cfg.batch_size, generator)
    for step in range(cfg.local_steps):
        batch, feats = work.train_batch(next(stream))
        opt.zero_grad(set_to_none=True)
        loss = split_step(edge, endpoint, batch, feats)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at local step {step}")
        if fisher is not None:  # squared gradients of the (LLM) loss, before the proximal term
            accumulate_squared(fisher, {k: p.grad for k, p in named.items()})
        if proximal_mu > 0 and anchor is not None:
            proximal_term(named, anchor, proximal_mu).backward()
        opt.step()
        losses.append(loss)
        if on_step:
            on_step(step, loss)
    edge.eval()
    out: dict = {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}
    if fisher is not None:
        out["fisher"] = mean_fisher(fisher, len(losses))
    return out


@torch.no_grad()
def candidate_scores(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, candidate_sets: dict[str, list[str]], batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
    """(sample index, log-likelihood of each candidate (K,), the candidates) for every sample.

    Samples are scored against their task's candidate set (`Sample.candidates`);
    for multiple choice only the first `n_choices` candidates are valid (the
    others get -inf).
    """
    edge.eval()
    for name in sorted({s.candidates for s in samples}):
        cands = candidate_sets[name]
        cand = candidate_batch(work.tokenizer, cands)
        cand_embeds = edge.embed(cand.input_ids, None)  # (K, L, d): candidates pass NanoAdapter-T too
        group = [i for i, s in enumerate(samples) if s.candidates == name]
        for j in range(0, len(group), batch_size):
            idx = group[j : j + batch_size]
            part = [samples[i] for i in idx]
            batch = prompt_batch(work.tokenizer, [s.content() for s in part], work.n_visual, work.system)
            embeds = edge.embed(batch.input_ids, work.images(part))
            lp = endpoint.score(embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask).cpu()  # (B, K), one copy per batch
            for row, s in enumerate(part):
                if s.n_choices:
                    lp[row, s.n_choices :] = float("-inf")
            yield from ((i, lp[row], cands) for row, i in enumerate(idx))
            if on_batch:
                on_batch(len(part))


def evaluate(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, candidate_sets: dict[str, list[str]], batch_size: int,
    categories: tuple[str, ...] = (), on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Closed-set accuracy: the valid candidate with the highest log-likelihood is the prediction."""
    correct = {i: cands[int(lp.argmax())] == samples[i].answer for i, lp, cands in candidate_scores(edge, endpoint, samples, work, candidate_sets, batch_size, on_batch)}
    return accuracy_report(samples, [correct[i] for i in range(len(samples))], categories)


def exact_fisher_batches(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, candidate_sets: dict[str, list[str]], batch_size: int,
) -> Iterator[tuple[TokenBatch, torch.Tensor | None, torch.Tensor]]:
    """For the exact Fisher: per sample, one row per valid candidate answer, weighted by
    the model's p(candidate | sample) (see fisher.empirical_fisher)."""
    scored = list(candidate_scores(edge, endpoint, samples, work, candidate_sets, batch_size))
    for i, lp, cands in scored:
        s = samples[i]
        valid = cands[: s.n_choices] if s.n_choices else cands
        p = candidate_distribution(lp[: len(valid)])
        batch = training_batch(work.tokenizer, [s.content()] * len(valid), list(valid), work.n_visual, work.system)
        yield batch, work.images([s] * len(valid)), p

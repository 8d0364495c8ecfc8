"""Diagonal Fisher information of the NanoAdapter parameters: every way FedNano computes it.

    empirical: F = (1/N) sum_i (d log p(y_i | x_i) / d theta)^2            (true answers y_i)
    exact:     F = (1/N) sum_i sum_c p(c | x_i) (d log p(c | x_i) / d theta)^2
               over the answer candidates c, p the model's own answer distribution
               (Matena & Raffel's Fisher merging, restricted to the closed answer set)

Per-sample gradients come cheaply through the split: the server differentiates
the *summed* NLL, whose gradient w.r.t. sample i's embeddings is sample i's own
(samples do not interact in a causal LM batch). The client turns these into
per-sample adapter gradients in closed form, for the whole batch at once (split.parts.sample_grads:
two batched contractions, no per-sample backward, no host synchronisation). In the cached split
protocols the server does this for the adapters it applies and sends back only their Fisher sums.

    fisher_pass          FedNano: an extra pass over some training samples (empirical or exact)
    FisherFromTraining   FedNano-EF: the mean squared gradient of the training steps (no extra pass)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fednano.client.adapters import NanoAdapter
from fednano.client.evaluation import candidate_scores
from fednano.client.features import Workload
from fednano.client.nanoedge import NanoEdge
from fednano.config import TrainConfig
from fednano.data.prompts import TokenBatch, training_batch
from fednano.data.samples import Sample
from fednano.diagnostics import relative_error
from fednano.split.endpoint import LLMEndpoint
from fednano.split.parts import sample_grads, weighted_squares


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


def adapter_sample_grads(adapter: NanoAdapter, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of an adapter y = x + s B(A(x)) (eval mode: no dropout; split.parts.sample_grads).

    x: (B, T, d) what the adapter received; g: (B, T, d) d loss / d y, zero where y was not used.
    -> {"A.weight": (B, r, d), "B.weight": (B, d, r)}.
    """
    gA, gB = sample_grads((adapter.A.weight, adapter.B.weight, adapter.scale), x, g)
    return {"A.weight": gA, "B.weight": gB}


def edge_sample_grads(
    edge: NanoEdge, text: torch.Tensor, vis: torch.Tensor, is_image: torch.Tensor, grad: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of both NanoAdapters {"adapter_t.A.weight": (B, r, d), ...} from what they received
    (NanoEdge.adapter_inputs: text (B, T, d), visual tokens at the image slots (B, T, d), the slot mask (B, T)) and
    grad (B, T, d), row i sample i's own d loss / d embeddings: text positions feed NanoAdapter-T, image slots -I."""
    slot = is_image.unsqueeze(-1)
    out = {}
    for name, adapter, x, g in (
        ("adapter_t", edge.adapter_t, text, grad.masked_fill(slot, 0)),
        ("adapter_i", edge.adapter_i, vis, grad.masked_fill(~slot, 0)),
    ):
        out.update({f"{name}.{p}": gs for p, gs in adapter_sample_grads(adapter, x, g).items()})
    return out


def empirical_fisher(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    data: Iterable[tuple[TokenBatch, torch.Tensor]] | Iterable[tuple[TokenBatch, torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], float]:
    """Diagonal Fisher over the batches in `data` -> (Fisher per parameter, samples).

    Items are (batch, features) - every row one sample at its true answer (empirical
    Fisher) - or (batch, features, weights): row r carries weight p_r, and a sample's
    rows (one per candidate answer) have weights summing to 1 (exact Fisher).
    """
    params = edge.adapter_parameters()
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0.0
    edge.eval()  # the Fisher of the model as it answers (and the closed form assumes no dropout)
    for batch, feats, *rest in data:
        with torch.no_grad():
            text, vis, is_image = edge.adapter_inputs(batch.input_ids, feats)  # (B, T, d) each
            embeds = edge.embed(batch.input_ids, feats)  # (B, T, d)
        # (reduction "sum" brings the whole (B, T, d) gradient back in every protocol: the closed form needs it)
        weights = rest[0].to(embeds.device, embeds.dtype) if rest else embeds.new_ones(embeds.shape[0])  # (B,)
        parts = edge.parts(batch.input_ids, feats)
        parts.weights = weights
        _, grad, _ = endpoint.train_step(embeds, batch.attention_mask, batch.labels, reduction="sum", parts=parts)
        with torch.no_grad():
            grad = grad.to(embeds.device, embeds.dtype)  # row i: d (sample i's NLL) / d its embeddings
            for k, gs in edge_sample_grads(edge, text, vis, is_image, grad).items():
                acc[k] += weighted_squares(gs, weights)
            for k, f in parts.fisher.items():  # the server's share (a cached protocol), where the gradient above is zero
                acc[k] += f.to(acc[k])
            n += float(weights.sum())
    return mean_fisher(acc, n), n


def exact_fisher_batches(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    samples: list[Sample],
    work: Workload,
    candidate_sets: dict[str, list[str]],
    batch_size: int,
) -> Iterator[tuple[TokenBatch, torch.Tensor | None, torch.Tensor]]:
    """For the exact Fisher: per sample, one row per valid candidate answer, weighted by
    the model's p(candidate | sample) (see empirical_fisher)."""
    scored = list(candidate_scores(edge, endpoint, samples, work, candidate_sets, batch_size))
    for i, lp, cands in scored:
        s = samples[i]
        valid = cands[: s.n_choices] if s.n_choices else cands
        p = candidate_distribution(lp[: len(valid)])
        batch = training_batch(work.tokenizer, [s.content()] * len(valid), list(valid), work.n_visual, work.system)
        yield batch, work.images([s] * len(valid)), p


def fisher_pass(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    train: list[Sample],
    work: Workload,
    cfg: TrainConfig,
    generator: torch.Generator,
    candidate_sets: dict[str, list[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """FedNano's Fisher: an extra pass over `cfg.fisher_samples` of the client's samples; with
    `candidate_sets` the exact Fisher (over each sample's candidate answers), else the empirical one."""
    n = min(cfg.fisher_samples, len(train))
    subset = [train[i] for i in torch.randperm(len(train), generator=generator)[:n].tolist()]
    if candidate_sets is not None:
        rows: Iterable = exact_fisher_batches(edge, endpoint, subset, work, candidate_sets, cfg.eval_batch_size)
    else:
        rows = (work.train_batch(subset[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size))
    fisher, _ = empirical_fisher(edge, endpoint, rows)
    return fisher


class FisherFromTraining:
    """FedNano-EF: a training-step hook that keeps the squared gradients of the LLM loss; the
    Fisher is their mean over steps (nothing extra computed or sent per step)."""

    def __init__(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._steps = 0

    def after_backward(self, params: dict[str, nn.Parameter]) -> None:
        if not self._acc:
            self._acc = {k: torch.zeros_like(p) for k, p in params.items()}
        accumulate_squared(self._acc, {k: p.grad for k, p in params.items() if p.grad is not None})
        self._steps += 1

    def fisher(self) -> dict[str, torch.Tensor]:
        return mean_fisher(self._acc, self._steps)


def fisher_sample_error(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    train: list[Sample],
    work: Workload,
    cfg: TrainConfig,
    generator: torch.Generator,
    factor: int = 4,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The empirical Fisher from `cfg.fisher_samples` samples, and (factor > 1) its relative error against the Fisher of
    `factor` times as many (those samples and more, as far as the client has them) -> (Fisher, error or None). How noisy
    the per-entry merge weights are at the configured sample count."""
    order = torch.randperm(len(train), generator=generator).tolist()
    n = min(cfg.fisher_samples, len(train))
    first, rest = [train[i] for i in order[:n]], [train[i] for i in order[n : factor * n]]

    def batches(samples: list[Sample]) -> Iterable:
        return (work.train_batch(samples[i : i + cfg.batch_size]) for i in range(0, len(samples), cfg.batch_size))

    small, n_small = empirical_fisher(edge, endpoint, batches(first))
    if factor <= 1 or not rest:
        return small, None
    more, n_more = empirical_fisher(edge, endpoint, batches(rest))
    large = {k: (small[k] * n_small + more[k] * n_more) / (n_small + n_more) for k in small}
    return small, relative_error(small, large)

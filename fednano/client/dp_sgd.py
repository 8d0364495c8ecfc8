"""Sample-level differential privacy for the NanoAdapters: DP-SGD (Abadi et al., CCS 2016), `privacy.dp_sgd`.

Each step takes a Poisson sample of the client's training set (every sample in with probability
q = train.batch_size / n, so the expected batch is train.batch_size), and

    g_i   = d (sample i's summed answer NLL) / d adapters    per sample, in closed form from the split:
                                                             the server differentiates the summed loss, so
                                                             row i of the returned gradient is sample i's own
    ḡ     = (sum_i g_i · min(1, C / ‖g_i‖) + N(0, σ²C² I)) / (q n)

and the optimiser steps on ḡ. ‖g_i‖ is over both adapters together (Opacus's flat clipping); C is
`privacy.clip_norm`, σ `privacy.noise_multiplier` (or Opacus's search for `privacy.target_epsilon`).
The (ε, δ) of a client's data after k steps is Opacus's RDP accountant at (σ, q, k)
(`privacy.dp_sgd_epsilon`); the server adds up each client's steps over the rounds it trained in.

Everything after ḡ is post-processing: a Fisher taken from these steps' gradients (FedNano under DP-SGD,
`Method.fisher_source`) costs no extra privacy, while a Fisher pass over the raw data would.

The clipping and noise maths is pure and tested against hand-computed values and against Opacus's
DPOptimizer (tests/test_dp_sgd.py). The noise and the Poisson batches (the accountant's subsampling is part of
the guarantee) are drawn from seeds of OS entropy that only the client holds (ClientJob.noise_seed): no one who
knows the config, the round or the model can redraw them. Only privacy.reproducible_noise (tests) fixes them.
The generators are torch's (not a CSPRNG, as Opacus's `secure_mode` would use): the seed is secret, not the stream's
future given many of its outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fednano.client.fisher import edge_sample_grads
from fednano.client.nanoedge import NanoEdge
from fednano.config import RunConfig, TrainConfig
from fednano.data.prompts import TokenBatch
from fednano.data.samples import Sample
from fednano.federation import keys
from fednano.privacy import noise_for_epsilon
from fednano.split.endpoint import LLMEndpoint

Tensors = dict[str, torch.Tensor]


def clip_and_sum(per_sample: Tensors, clip: float) -> tuple[Tensors, torch.Tensor]:
    """sum_i g_i · min(1, C / (‖g_i‖ + 1e-6)) over dim 0 of every tensor, ‖g_i‖ over all of sample i's tensors
    together (as Opacus clips). -> (the clipped sums, each sample's norm (B,))."""
    norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()  # (B,)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor.to(g.dtype), g) for k, g in per_sample.items()}, norms


def privatize(sums: Tensors, clip: float, noise_multiplier: float, expected_batch: float, generator: torch.Generator) -> Tensors:
    """(sum + N(0, (σ C)²)) / expected_batch for every tensor: DP-SGD's noised mean gradient (the noise drawn on the
    generator's device, the tensors' own)."""
    out = {}
    for k, s in sums.items():
        z = torch.randn(s.shape, generator=generator, device=generator.device, dtype=torch.float32)
        out[k] = (s.float() + noise_multiplier * clip * z.to(s.device)).to(s.dtype) / expected_batch
    return out


def poisson_batches(samples: list[Sample], rate: float, generator: torch.Generator) -> Iterator[list[Sample]]:
    """Endless Poisson-sampled batches: every sample in each batch independently with probability `rate` (what the
    accountant assumes; a batch may be empty)."""
    if not samples:
        raise ValueError("no training samples")
    while True:
        keep = torch.rand(len(samples), generator=generator) < rate
        yield [s for s, k in zip(samples, keep.tolist(), strict=True) if k]


@dataclass
class DPSGD:
    """One client's DP-SGD: its clip norm C, noise multiplier σ and sampling rate q over its n samples."""

    clip: float
    noise_multiplier: float
    rate: float
    n: int
    generator: torch.Generator  # the noise's, on the client's device
    sampler: torch.Generator | None = None  # the Poisson batches' (CPU; None: the caller's stream)

    @classmethod
    def of(cls, cfg: RunConfig, n: int, train: TrainConfig, device: torch.device, noise_seed: int, batch_seed: int) -> DPSGD:
        """This client's DP-SGD for a round of `train.local_steps` steps over its n samples: q = batch_size / n, σ from
        privacy.noise_multiplier or, with privacy.target_epsilon, Opacus's search for federation.rounds such rounds (as if the
        client trained in every one). The noise generator, on `device`, and the batch sampler are seeded by the client's secret
        seeds (ClientJob.noise_seed)."""
        p = cfg.privacy
        rate = min(1.0, train.batch_size / n)
        sigma = noise_for_epsilon(p.target_epsilon, p.delta, rate, train.local_steps * cfg.federation.rounds) if p.target_epsilon \
            else p.noise_multiplier
        return cls(p.clip_norm, sigma, rate, n, torch.Generator(device=device).manual_seed(noise_seed),
                   torch.Generator().manual_seed(batch_seed))

    def report(self, steps: int) -> dict[str, float]:
        """What the client tells the server, for its ledger (privacy.dp_sgd_ledger)."""
        return {keys.DP_SGD_SIGMA: self.noise_multiplier, keys.DP_SGD_RATE: self.rate, keys.DP_SGD_STEPS: float(steps)}

    @property
    def expected_batch(self) -> float:
        return self.rate * self.n

    def step(self, edge: NanoEdge, endpoint: LLMEndpoint, batch: tuple[TokenBatch, torch.Tensor | None] | None,
             params: dict[str, nn.Parameter]) -> float | None:
        """One DP-SGD step's gradient on `batch` (tokens, image features), left in `params`' .grad (the noised clipped
        mean); -> the batch's mean answer NLL (None for an empty Poisson batch, whose gradient is noise alone)."""
        loss = None
        if batch is None:
            sums = {k: torch.zeros_like(p) for k, p in params.items()}
        else:
            loss, per_sample = sample_gradients(edge, endpoint, *batch)
            sums, _ = clip_and_sum({k: per_sample[k] for k in params}, self.clip)
        for k, g in privatize(sums, self.clip, self.noise_multiplier, self.expected_batch, self.generator).items():
            params[k].grad = g.to(params[k].dtype)
        return loss


def sample_gradients(edge: NanoEdge, endpoint: LLMEndpoint, batch: TokenBatch, features: torch.Tensor | None) -> tuple[float, Tensors]:
    """(the batch's mean answer NLL, each sample's gradient of its own summed answer NLL w.r.t. every adapter tensor
    {name: (B, ...)}), from one split step with the summed loss (adapters in eval mode: no dropout)."""
    with torch.no_grad():
        text, vis, is_image = edge.adapter_inputs(batch.input_ids, features)
        embeds = edge.embed(batch.input_ids, features)
    loss, grad, tokens = endpoint.train_step(embeds, batch.attention_mask, batch.labels, reduction="sum")
    with torch.no_grad():
        per_sample = edge_sample_grads(edge, text, vis, is_image, grad.to(embeds.device, embeds.dtype))
    return float(loss) / max(tokens, 1), per_sample

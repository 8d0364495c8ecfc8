"""What crosses the split channel for a batch: the whole input embeddings, or the parts they are made of.

    activations           embeddings (B, T, d) up, their gradient (B, T, d) down       (the paper's split)
    cached-features       each image's frozen connector output up once (the server keeps it, keyed by
                          the hash of the image's encoder features); per step the text rows, the image slots, the image keys and
                          NanoAdapter-I's weights up; the text rows' gradient and NanoAdapter-I's
                          gradient down
    cached-features+ids   as cached-features, but the token ids and NanoAdapter-T's weights go up instead
                          of the text rows (the server embeds them with its own table), and only the two
                          adapters' gradients come down

The server applies the adapters exactly as the NanoEdge does (`low_rank`), so the client's gradients
are the same in every protocol (tests/test_protocols.py); only the bytes change. The adapters run
without dropout on the server, so the cached protocols need `adapter.dropout = 0`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fednano.split.protocols import PROTOCOLS as PROTOCOLS  # (the registry, re-exported: torch-free, config.py reads it)
from fednano.split.protocols import Protocol as Protocol
from fednano.split.protocols import StepShape as StepShape

LowRank = tuple[torch.Tensor, torch.Tensor, float]  # (A (r, d), B (d, r), scale): y = x + scale * B(A(x))


def low_rank(x: torch.Tensor, adapter: LowRank) -> torch.Tensor:
    """A NanoAdapter's forward without dropout, in x's dtype: x + scale * (x A^T) B^T."""
    A, B, scale = adapter
    return x + scale * ((x @ A.T) @ B.T)


def sample_grads(adapter: LowRank, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of y = x + s B(A(x)) in closed form (no per-sample backward):

        dL/dB = s sum_t g_t (A x_t)^T        dL/dA = s sum_t (B^T g_t) x_t^T

    x: (B, T, d) what the adapter received; g: (B, T, d) d loss / d y, zero where y was not used.
    -> (per-sample dL/dA (B, r, d), per-sample dL/dB (B, d, r))."""
    A, B, scale = adapter
    h = x @ A.T  # (B, T, r)
    gb = g @ B  # (B, T, r)
    return scale * torch.einsum("btr,btd->brd", gb, x), scale * torch.einsum("btd,btr->bdr", g, h)


def weighted_squares(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b weights_b * per_sample_b ** 2: one batch's contribution to a diagonal Fisher."""
    return torch.einsum("b,b...->...", weights.to(per_sample), per_sample**2)


def feature_key(features: torch.Tensor) -> str:
    """Content key of one image: a hash of the float32 bytes of its frozen encoder features (the connector, frozen
    too, is a function of them; hashing its input rather than its output is cheaper where it widens the features)."""
    raw = features.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass
class EdgeParts:
    """How a batch's input embeddings were made on the client (NanoEdge.parts), for the protocols that
    send less than the embeddings. `adapters` holds the live parameters: a protocol that has the server
    back-propagate an adapter adds the returned gradient to their `.grad`, where backward would put it."""

    input_ids: torch.Tensor  # (B, T), image slots marked IMAGE_PLACEHOLDER
    is_image: torch.Tensor  # (B, T) bool
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # "adapter_i" / "adapter_t" -> (A, B, scale)
    connect: Callable[[], torch.Tensor | None]  # -> (M, N, d) frozen connector outputs, one per image in slot order
    features: torch.Tensor | None = None  # (M, P, C) the frozen encoder features the connector takes (the images' keys)
    # a Fisher pass: each row's weight (B,) in; the weighted squared per-sample gradients of the adapters the server
    # computed them for out ("adapter_i.A.weight" -> (r, d), ...), their positions' gradient then left at zero
    weights: torch.Tensor | None = None
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    _visual: list = field(default_factory=list, repr=False)
    _keys: list = field(default_factory=list, repr=False)

    @property
    def visual(self) -> torch.Tensor | None:
        """The connector outputs, computed on first use (the activations protocol never asks)."""
        if not self._visual:
            with torch.no_grad():
                self._visual.append(self.connect())
        return self._visual[0]

    def keys(self) -> list[str]:
        """Each image's content key, hashed once per batch."""
        if not self._keys:
            images = self.features if self.features is not None else self.visual
            self._keys.append([] if images is None else [feature_key(v) for v in images])
        return self._keys[0]

    def add_grads(self, name: str, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
        """Add the server's gradient of adapter `name`'s weights to their `.grad` (where backward puts it)."""
        A, B, _ = self.adapters[name]
        for p, g in ((A, grad_A), (B, grad_B)):
            g = g.to(p.device, p.dtype)
            p.grad = g if p.grad is None else p.grad + g

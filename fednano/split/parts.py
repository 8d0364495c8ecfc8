"""What crosses the split channel for a batch: the whole input embeddings, or the parts they are made of.

    activations           embeddings (B, T, d) up, their gradient (B, T, d) down       (the paper's split)
    cached-features       each image's frozen connector output up once (the server keeps it, keyed by
                          its hash); per step the text rows, the image slots, the image keys and
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

LowRank = tuple[torch.Tensor, torch.Tensor, float]  # (A (r, d), B (d, r), scale): y = x + scale * B(A(x))


@dataclass(frozen=True)
class Protocol:
    name: str
    caches_features: bool  # visual tokens cross once per image, as frozen connector outputs
    sends_ids: bool  # text crosses as token ids (the server embeds them), not as embeddings
    reveals: str  # what the server learns beyond the activations protocol (README)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("activations", False, False, "the adapted input embeddings of every step"),
        Protocol("cached-features", True, False, "each image's frozen connector output (once), NanoAdapter-I's weights every step"),
        Protocol("cached-features+ids", True, True, "as cached-features, plus the token ids and NanoAdapter-T's weights"),
    )
}


def low_rank(x: torch.Tensor, adapter: LowRank) -> torch.Tensor:
    """A NanoAdapter's forward without dropout, in x's dtype: x + scale * (x A^T) B^T."""
    A, B, scale = adapter
    return x + scale * ((x @ A.T) @ B.T)


def feature_key(features: torch.Tensor) -> str:
    """Content key of one image's connector output (N, d): a hash of its float32 bytes."""
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
    _visual: list = field(default_factory=list, repr=False)

    @property
    def visual(self) -> torch.Tensor | None:
        """The connector outputs, computed on first use (the activations protocol never asks)."""
        if not self._visual:
            with torch.no_grad():
                self._visual.append(self.connect())
        return self._visual[0]

    def keys(self) -> list[str]:
        return [] if self.visual is None else [feature_key(v) for v in self.visual]

    def add_grads(self, name: str, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
        """Add the server's gradient of adapter `name`'s weights to their `.grad` (where backward puts it)."""
        A, B, _ = self.adapters[name]
        for p, g in ((A, grad_A), (B, grad_B)):
            g = g.to(p.device, p.dtype)
            p.grad = g if p.grad is None else p.grad + g

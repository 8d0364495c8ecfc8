"""The label-private ("U-shaped") split (`split.label_private`): the answers never leave the client.

A training step takes two frames. The client sends its input embeddings and the positions that predict an
answer token (not the tokens); the server returns the LLM's final hidden states there. The client applies
the output head itself (for an LLM whose head is its input-embedding table, the NanoEdge holds it already),
computes the loss against its labels, and sends d loss / d hidden states; the server back-propagates them
through the LLM (recomputing the forward: it keeps nothing between frames) and returns d loss / d embeddings.
The client's gradients are the standard split's (tests/test_label_private.py).

What it does not hide: a server that knows the head and the hidden states it sent can read each label from
the gradient it gets back (`labels_from_gradients`: the known-head attack of the split-learning literature),
so the labels are hidden only from a server that cannot or does not run it, unless the gradient is noised.
Nor does it keep the answers out of the inputs: a training frame is teacher-forced, so its input embeddings carry the
answer tokens (the NanoEdge's embeddings of them, which privacy.audit's text attack reads back by nearest row). Against
an honest-but-curious server that reads its frames it hides nothing; only privacy.label_epsilon protects the answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fednano.data.prompts import IGNORE_INDEX
from fednano.privacy import noise_seed
from fednano.split.client import SplitClient
from fednano.split.parts import EdgeParts


def head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d hidden) of the next-token NLL with logits hidden (N, d) @ head (V, d)ᵀ against `targets` (N,):
    "mean" over the N tokens, or "sum" (per-sample gradients for the Fisher)."""
    h = hidden.detach().float().requires_grad_(True)
    nll = F.cross_entropy(h @ head.to(h.device).float().T, targets.to(h.device), reduction="sum")
    loss = nll / targets.numel() if reduction == "mean" else nll
    (grad,) = torch.autograd.grad(loss, h)
    return loss.detach(), grad


def labels_from_gradients(hidden: torch.Tensor, grad_hidden: torch.Tensor, head: torch.Tensor, scale: float) -> torch.Tensor:
    """The known-head label attack: the gradient of the NLL w.r.t. one position's hidden state h is
    scale · Wᵀ(softmax(W h) − e_y), so W[y] = Wᵀ softmax(W h) − grad / scale, and y is the nearest row of W.
    `scale` is 1/N for a mean over N tokens (the server knows N: it is the number of positions asked for)."""
    w = head.float()
    h, g = hidden.to(w.device).float(), grad_hidden.to(w.device).float()
    row = torch.softmax(h @ w.T, dim=-1) @ w - g / scale  # (N, d)
    return torch.cdist(row, w).argmin(dim=1)


def noised_gradient(grad_hidden: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """The gradient plus Gaussian noise scaled to each position's own gradient: N(0, (level ‖g_i‖ / √d)² I) on row i, so
    that the noise's expected norm is about `level` times the row's (privacy.gradient_noise)."""
    d = grad_hidden.shape[-1]
    std = level * grad_hidden.norm(dim=-1, keepdim=True) / d**0.5
    return grad_hidden + std * torch.randn(grad_hidden.shape, generator=generator, device=grad_hidden.device, dtype=grad_hidden.dtype)


class LabelPrivateClient(SplitClient):
    """A SplitClient whose training steps keep the labels on the client (evaluation and generation are unchanged:
    they send no labels). `head`: the output head's weight (V, d), on the client's device; `gradient_noise`: the
    noise on d loss / d hidden states it sends (privacy.gradient_noise; 0: none), drawn on the head's device from a
    seed of OS entropy that only this client knows (ClientJob reseeds it per message; a fixed seed only under
    privacy.reproducible_noise)."""

    def __init__(self, *args: object, head: torch.Tensor, gradient_noise: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.head, self.gradient_noise = head, gradient_noise
        self.reseed(noise_seed(False))

    def reseed(self, seed: int) -> None:
        self._generator = torch.Generator(device=self.head.device).manual_seed(seed)

    def train_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", *, parts: EdgeParts | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        targets = labels[:, 1:].to(embeds.device)  # token t+1 is predicted at position t
        sel = targets != IGNORE_INDEX
        if not sel.any():
            raise ValueError("labels contain no supervised token")
        positions = F.pad(sel, (0, 1), value=False)
        hidden = self.hidden(embeds, mask, positions)
        loss, grad_hidden = head_loss(hidden, targets[sel], self.head, reduction)
        if self.gradient_noise:
            grad_hidden = noised_gradient(grad_hidden, self.gradient_noise, self._generator)
        return loss, self.hidden_backward(embeds, mask, positions, grad_hidden), int(sel.sum())

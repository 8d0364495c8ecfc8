"""NanoAdapter: the low-rank residual adapter at the connector / LLM interface.

    y = x + (alpha / r) * B(A(x)),   A: d -> r,  B: r -> d,  B = 0 at init

so a fresh adapter is the identity and training starts from the pretrained MLLM.
NanoAdapter-I adapts the visual tokens after the connector, NanoAdapter-T the
text-token embeddings. Only these parameters train and cross the network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The trainable tensors, named as data: this list *is* what crosses the wire.
ADAPTER_NAMES = ("adapter_i", "adapter_t")
ADAPTER_PARAM_NAMES = tuple(f"{a}.{p}" for a in ADAPTER_NAMES for p in ("A.weight", "B.weight"))


class NanoAdapter(nn.Module):
    def __init__(self, dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.rank, self.scale = dim, rank, alpha / rank
        self.A = nn.Linear(dim, rank, bias=False)  # (r, d)
        self.B = nn.Linear(rank, dim, bias=False)  # (d, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # LoRA's init: A ~ kaiming-uniform, B = 0 (identity at start).
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            self.A.weight.uniform_(-bound, bound, generator=generator)
            self.B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return x + self.scale * self.B(self.A(self.dropout(x)))


def adapter_param_count(dim: int, rank: int) -> int:
    """Parameters of NanoAdapter-I + NanoAdapter-T: 2 * (d*r + r*d)."""
    return 2 * (dim * rank + rank * dim)


def copy_state(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `params` in place; keys and shapes must match exactly (errors name `what`)."""
    if set(state) != set(params):
        raise ValueError(f"{what} state keys {sorted(state)} != expected {sorted(params)}")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"{what} tensor {k}: shape {tuple(state[k].shape)} != expected {tuple(p.shape)}")
            p.copy_(state[k])

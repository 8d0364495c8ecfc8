"""The connector: vision features -> LLM embedding space (LLaVA-1.5's Linear-GELU-Linear)."""

from __future__ import annotations

from torch import nn


class Connector(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

"""What the client computes against: anything with ServerLLM's `train_step` / `score` / `generate`.

The remote SplitClient (a client), the ServerLLM itself (the server's own evaluation and
connector pre-training), or a client-held LLM with LoRA (the comparison family).

`parts` (NanoEdge.parts) says how `embeds` were made; the split client may send them instead of the
embeddings (`split.protocol`, split.parts). In process the embeddings hold everything, and it is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fednano.split.parts import EdgeParts


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded: at most `max_new_tokens` tokens each; greedy at temperature 0, else sampled at
    `temperature` after nucleus (`top_p`) filtering, from a generator seeded with `seed`. One value travels from
    the command line (or the evaluation's Scoring) through the split channel to ServerLLM.generate."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def to_meta(self) -> dict:
        """As a generate frame's meta carries it (split/server.py checks each field)."""
        return {"max_new_tokens": int(self.max_new_tokens), "temperature": float(self.temperature), "top_p": float(self.top_p),
                "seed": int(self.seed)}


GREEDY = Decoding()


class LLMEndpoint(Protocol):
    def train_step(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   reduction: str = "mean", *, parts: EdgeParts | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (loss, d loss / d embeds, label tokens). reduction "sum": per-sample gradients (Fisher).
        Where the server back-propagated an adapter itself (a parts protocol), that adapter's gradient is
        already in its `.grad` and the returned gradient is zero at the positions it produced."""
        ...

    def score(self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor,
              cand_mask: torch.Tensor, *, parts: EdgeParts | None = None) -> torch.Tensor:
        """-> log-likelihood of each candidate after each prompt (B, K)."""
        ...

    def generate(self, embeds: torch.Tensor, mask: torch.Tensor, text_adapter: tuple[torch.Tensor, torch.Tensor, float],
                 stop: list[int], decoding: Decoding = GREEDY, *, parts: EdgeParts | None = None) -> list[list[int]]:
        """-> each answer's token ids after B padded prompts (B, T, d); generated tokens are embedded through
        NanoAdapter-T (`text_adapter` = (A, B, scale))."""
        ...

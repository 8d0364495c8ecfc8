"""The split protocols (split.protocol): one entry each, what crosses per step and its byte formulas (split/parts.py
says what each sends, and computes it). Standard library only: config.py takes the names and the checks from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fednano.errors import ConfigError

if TYPE_CHECKING:
    from fednano.config import RunConfig


@dataclass(frozen=True)
class StepShape:
    """A training step's shapes, for counting its bytes: `batch` samples of one image (`visual_tokens`) and
    `text_tokens` each, hidden size d, adapter rank r, `wire_bytes` per activation value (bf16: 2, fp8/int8: 1)."""

    batch: int
    visual_tokens: int
    text_tokens: int
    hidden: int
    rank: int
    wire_bytes: int = 2

    @property
    def tokens(self) -> int:
        return self.batch * (self.visual_tokens + self.text_tokens)


# Adapters (weights up, gradients and Fisher sums down), the loss and the Fisher weights go as float32 on every wire:
# rounding the adapters' gradients to bf16 costs more than the activations protocol's bf16 wire does (measured:
# 1.9e-3 vs 1.3e-3 relative error on the tiny model), so the cached protocols stay exact. Ids and labels go as
# int32, masks as uint8.
_F32, _I32, _U8 = 4, 4, 1


@dataclass(frozen=True)
class Protocol:
    name: str
    caches_features: bool  # visual tokens cross once per image, as frozen connector outputs
    sends_ids: bool  # text crosses as token ids (the server embeds them), not as embeddings
    reveals: str  # what the server learns beyond the activations protocol (docs/architecture.md)

    @property
    def sends_embeddings(self) -> bool:
        """The whole adapted input embeddings cross (the paper's split): the client applies both adapters itself."""
        return not self.caches_features and not self.sends_ids

    def check(self, cfg: RunConfig) -> None:
        """Refuse settings this protocol cannot honour (ConfigError naming the field), as Method.check does."""
        if cfg.split.label_private and not self.sends_embeddings:
            raise ConfigError(f"split.label_private: the U-shaped split needs split.protocol = 'activations' (not {self.name!r})")
        if cfg.privacy.embedding_noise != 0 and not self.sends_embeddings:
            raise ConfigError(f"privacy.embedding_noise: noise on the text embeddings needs split.protocol = 'activations' ({self.name!r} "
                              "sends the text as token ids or as rows the noise does not reach)")
        if not self.sends_embeddings and cfg.adapter.dropout != 0:
            raise ConfigError(f"split.protocol: {self.name!r} needs adapter.dropout = 0 (the server applies the adapters it caches for, "
                              "without the client's dropout mask); use 'activations' or set adapter.dropout = 0")
        if cfg.privacy.dp_sgd and not (self.sends_embeddings and cfg.adapter.dropout == 0):
            raise ConfigError(f"privacy.dp_sgd: per-sample gradients need split.protocol = 'activations' and adapter.dropout = 0 (this "
                              f"config: {self.name!r}, {cfg.adapter.dropout})")

    def step_bytes(self, s: StepShape) -> tuple[int, int]:
        """Payload bytes (up, down) of one training step as SplitClient sends it (frame headers, a few hundred
        bytes, not counted); tests/test_protocols.py checks them against encoded frames."""
        adapter = 2 * s.rank * s.hidden * _F32  # A and B of one adapter
        text_rows = s.batch * s.text_tokens * s.hidden * s.wire_bytes
        up, down = s.tokens * (_U8 + _I32), _F32  # mask and labels up; the loss down
        if not self.caches_features:
            return up + s.tokens * s.hidden * s.wire_bytes, down + s.tokens * s.hidden * s.wire_bytes
        if self.sends_ids:
            return up + s.tokens * _I32 + 2 * adapter, down + 2 * adapter
        return up + s.tokens * _U8 + text_rows + adapter, down + text_rows + adapter

    def fisher_step_bytes(self, s: StepShape) -> tuple[int, int]:
        """A Fisher-pass step: activations, the request of a training step and the whole (B, T, d) gradient down; the
        cached protocols add the rows' weights up and get, for each adapter the server applied, its Fisher sums
        (the shape of its gradient), and the text rows' gradient if they were sent."""
        up, down = self.step_bytes(s)
        if not self.caches_features:
            return up, _F32 + s.tokens * s.hidden * s.wire_bytes
        return up + s.batch * _F32, down

    def image_bytes(self, s: StepShape) -> int:
        """Each image's connector output, sent once (cached protocols)."""
        return s.visual_tokens * s.hidden * s.wire_bytes if self.caches_features else 0


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("activations", False, False, "the adapted input embeddings of every step"),
        Protocol("cached-features", True, False, "each image's frozen connector output (once), NanoAdapter-I's weights every step"),
        Protocol("cached-features+ids", True, True, "as cached-features, plus the token ids and NanoAdapter-T's weights"),
    )
}

"""NanoEdge: everything a client holds.

    images -> vision encoder (frozen) -> connector (frozen) -> NanoAdapter-I ─┐
    text ids -> LLM input-embedding table (frozen) -> NanoAdapter-T ──────────┴-> input embeddings

The output is the sequence of input embeddings the server LLM consumes. The
client never holds an LLM transformer block: only the embedding table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fednano.client.adapters import ADAPTER_PARAM_NAMES, NanoAdapter, copy_state
from fednano.config import AdapterConfig
from fednano.data.prompts import IMAGE_PLACEHOLDER
from fednano.split.parts import EdgeParts


class NanoEdge(nn.Module):
    def __init__(
        self,
        vision: nn.Module,
        connector: nn.Module,
        embed_tokens: nn.Embedding,
        adapter: AdapterConfig,
        num_visual_tokens: int | None = None,
    ) -> None:
        """vision: frozen images -> features (M, P, C); connector: features -> (M, N, d)."""
        super().__init__()
        self._num_visual_tokens = int(num_visual_tokens if num_visual_tokens is not None else vision.num_tokens)  # type: ignore[arg-type]
        dim = embed_tokens.embedding_dim
        self.vision, self.connector, self.embed_tokens = vision, connector, embed_tokens
        for frozen in self._frozen():
            frozen.requires_grad_(False)
            frozen.eval()
        self.adapter_i = NanoAdapter(dim, adapter.rank, adapter.alpha, adapter.dropout)
        self.adapter_t = NanoAdapter(dim, adapter.rank, adapter.alpha, adapter.dropout)
        # privacy.embedding_noise: what a client adds to the text embeddings it sends (fednano.privacy.TextNoise); None: nothing
        self.text_noise: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _frozen(self) -> tuple[nn.Module, ...]:
        return (self.vision, self.connector, self.embed_tokens)

    def train(self, mode: bool = True) -> NanoEdge:
        """Only the adapters change mode: frozen parts stay in eval (no dropout, fixed norms)."""
        super().train(mode)
        for frozen in self._frozen():
            frozen.eval()
        return self

    @property
    def dim(self) -> int:
        return self.embed_tokens.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image that reach the LLM (after the connector)."""
        return self._num_visual_tokens

    # --- the trainable state (what crosses the wire) -------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        named = dict(self.named_parameters())
        return {name: named[name] for name in ADAPTER_PARAM_NAMES}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.adapter_parameters().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        copy_state(self.adapter_parameters(), state, "adapter")

    # --- forward ------------------------------------------------------------------
    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(M, P, C) encoder features -> (M, N, d) adapted visual tokens."""
        return self.adapter_i(self.connector(features))

    def _sequence(
        self, input_ids: torch.Tensor, features: torch.Tensor | None, adapted: bool, noised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(text embeddings (B, T, d), visual tokens (M*N, d) in slot order or None, image-slot mask (B, T)),
        through the adapters or (adapted=False) as the adapters receive them; `noised`: with `text_noise` added
        to the adapted text embeddings."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == IMAGE_PLACEHOLDER  # (B, T)
        text = self.embed_tokens(input_ids.clamp(min=0))  # (B, T, d)
        if adapted:
            text = self.adapter_t(text)
        if noised and self.text_noise is not None:
            text = self.text_noise(text)
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return text, None, is_image
        if features is None:
            vis = text.new_zeros(0, self.dim)
        else:
            vis = (self.visual_tokens(features) if adapted else self.connector(features)).reshape(-1, self.dim)  # (M*N, d)
        if vis.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image placeholders but {vis.shape[0]} visual tokens")
        return text, vis.to(text.dtype), is_image

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None, noised: bool = True) -> torch.Tensor:
        """Adapted input embeddings (B, T, d), as the client sends them (with `text_noise` on the text positions,
        when set, unless `noised` is False: e.g. the public answer candidates).

        input_ids: (B, T), visual positions marked IMAGE_PLACEHOLDER, each run of
        N placeholders filled, in row-major order, by one image's N tokens from
        `features` (M, N, C) (M = images in the batch; None if there are none).
        """
        text, vis, is_image = self._sequence(input_ids, features, adapted=True, noised=noised)
        return text if vis is None else text.masked_scatter(is_image.unsqueeze(-1), vis)

    def parts(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> EdgeParts:
        """What `embed` is made of, for the split protocols that send parts (split.parts): the ids, the
        image slots, the frozen connector outputs (M, N, d) and the live adapters."""
        input_ids = input_ids.to(self.device)
        adapters = {name: (a.A.weight, a.B.weight, a.scale) for name, a in (("adapter_i", self.adapter_i), ("adapter_t", self.adapter_t))}
        connect = lambda: None if features is None else self.connector(features)  # noqa: E731 - computed only if sent
        return EdgeParts(input_ids, input_ids == IMAGE_PLACEHOLDER, adapters, connect, features)

    def text_adapter(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """NanoAdapter-T as (A (r, d), B (d, r), scale): what a decoder needs to embed each generated token
        as this NanoEdge would."""
        a = self.adapter_t
        return a.A.weight.detach(), a.B.weight.detach(), a.scale

    def adapter_inputs(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What each adapter receives, laid out as the sequence: (text embeddings (B, T, d), visual
        tokens at the image slots and zeros elsewhere (B, T, d), image-slot mask (B, T))."""
        text, vis, is_image = self._sequence(input_ids, features, adapted=False)
        placed = torch.zeros_like(text)
        return text, placed if vis is None else placed.masked_scatter(is_image.unsqueeze(-1), vis), is_image

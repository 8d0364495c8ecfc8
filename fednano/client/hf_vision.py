"""Vision towers and connectors of Hugging Face MLLMs, as NanoEdge parts.

    LLaVA-1.5:  CLIP vision tower, hidden state of layer `feature_layer` (-2),
                CLS dropped ("default" strategy)  -> multi-modal projector
    BLIP-2 / MiniGPT-4:  ViT last hidden state  -> Q-Former (learned queries,
                cross-attending to the image) -> language projection

Each encoder takes uint8 images and does the processor's job for square
images (resize to `image_size`, rescale, normalise with the processor's mean
and std), so the client needs no image processor; the maths of each part is
the HF module's own, called exactly as the HF model calls it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFVisionTower(nn.Module):
    """uint8 images (B, 3, H, W) -> patch features (B, N, C) from a HF vision model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, tower: Any, image_size: int, mean: tuple, std: tuple, feature_layer: int | None, drop_cls: bool) -> None:
        """tower: a transformers vision model (CLIPVisionModel, Blip2VisionModel)."""
        super().__init__()
        self.tower, self.image_size = tower, image_size
        self.feature_layer, self.drop_cls = feature_layer, drop_cls
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        cfg = tower.config
        n = (cfg.image_size // cfg.patch_size) ** 2 + (0 if drop_cls else 1)
        self.num_tokens, self.feature_dim = n, cfg.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> HFVisionTower:  # frozen
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(images))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Processor-normalised pixel values -> (B, N, C), as the HF MLLM selects them."""
        if self.feature_layer is None:
            out = self.tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        else:
            out = self.tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True).hidden_states[self.feature_layer]
        return out[:, 1:] if self.drop_cls else out


class QFormerConnector(nn.Module):
    """BLIP-2's connector: learned queries cross-attend to the image -> language projection."""

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, language_projection: nn.Linear) -> None:
        super().__init__()
        self.query_tokens, self.qformer, self.language_projection = query_tokens, qformer, language_projection

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:  # (M, P, C) -> (M, Q, d)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, return_dict=True)[0]
        return self.language_projection(out.to(image_embeds.dtype))

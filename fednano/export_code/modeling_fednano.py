"""An exported FedNano MLLM for plain transformers: vision encoder -> grid pooling -> connector -> causal LM.

    pixel_values (M, 3, S, S) -> encoder feature map (M, C, h, w) -> average-pooled to g x g, row-major (M, g*g, C)
      -> connector Linear-GELU-Linear (M, g*g, d), NanoAdapter-I folded into its last layer
    input_ids with g*g `image_token_id` slots per image -> the LLM's embedding table (NanoAdapter-T folded in)
      -> the slots filled with the visual tokens, in order -> the causal LM

Written by `fednano export` into the model's folder, with the encoder's weights in the folder's safetensors:
imports torch and transformers only. EfficientNet-Lite0 is re-stated here (the architecture of
lukemelas/EfficientNet-PyTorch as packaged in `efficientnet-lite-pytorch`, Apache-2.0), with the same parameter
names, so the folder needs neither that package nor FedNano.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_fednano import FedNanoConfig

# EfficientNet-Lite0's stages: (repeats, kernel, stride, expand ratio, in channels, out channels). Lite models
# use ReLU6 and no squeeze-excitation; the stem (32) and head (1280) are not scaled.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
LITE0_DESIGN_SIZE = 224  # TF-style "same" padding is fixed at construction for this input size, whatever size comes in
BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow's 'SAME' padding computed once for an input of `size` (as the package does)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        pad = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k (stride) -> 1x1 project, BatchNorm after each, ReLU6."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SamePadConv2d(mid, cout, 1, 1, math.ceil(size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand, self.residual = expand, stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand != 1 else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x  # drop-connect is training-only: the encoder is frozen


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its last feature map: (B, 3, S, S) normalised to [-1, 1] -> (B, 1280, S/32, S/32)."""

    feature_dim = 1280

    def __init__(self) -> None:
        super().__init__()
        size = LITE0_DESIGN_SIZE
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):  # the first block of a stage strides and widens; the others keep the shape
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout, size))
                size = math.ceil(size / stride) if i == 0 else size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(320, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))


class TinyCNN(nn.Module):
    """FedNano's test encoder (the `tiny` backbone): two strided convs with GELU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.feature_dim = channels
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FedNanoVisionTower(nn.Module):
    """The frozen encoder and its pooling: preprocessed images (M, 3, S, S) -> (M, grid*grid, C)."""

    def __init__(self, vision_config: dict) -> None:
        super().__init__()
        kind = vision_config["type"]
        if kind == "efficientnet-lite0":
            self.backbone: nn.Module = EfficientNetLite0()
        elif kind == "tiny-cnn":
            self.backbone = TinyCNN(int(vision_config["channels"]))
        else:
            raise ValueError(f"unknown vision encoder type {kind!r} (known: efficientnet-lite0, tiny-cnn)")
        self.grid = int(vision_config["grid"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(pixel_values)  # (M, C, h, w)
        pooled = F.adaptive_avg_pool2d(fmap, self.grid)  # (M, C, g, g)
        return pooled.flatten(2).transpose(1, 2)  # (M, g*g, C)


class FedNanoProjector(nn.Sequential):
    """The connector, LLaVA-1.5's Linear-GELU-Linear: (M, N, C) -> (M, N, d)."""

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class FedNanoForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Vision tower + connector + causal LM, with `generate`. The vision side stays in float32 whatever dtype the
    LLM is loaded in (as on a FedNano client); its tokens are cast to the LLM's dtype where they enter it."""

    config_class = FedNanoConfig
    config: FedNanoConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]  # noqa: RUF012 - transformers declares it so
    _keep_in_fp32_modules = ["vision_tower", "multi_modal_projector"]  # noqa: RUF012 - transformers declares it so
    _keep_in_fp32_modules_strict = ["vision_tower", "multi_modal_projector"]  # noqa: RUF012 - in bf16 too
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: FedNanoConfig) -> None:
        super().__init__(config)
        text = config.get_text_config()
        self.vision_tower = FedNanoVisionTower(config.vision_config)
        self.multi_modal_projector = FedNanoProjector(int(config.vision_config["feature_dim"]), text.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(text)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint; the LLM initialises its own

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (M, 3, S, S) -> visual tokens (M, g*g, d), in float32."""
        params = next(self.vision_tower.parameters())
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(params.device, params.dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, T, d): the embedding table's rows, and each image's visual tokens at its slots."""
        is_image = input_ids.eq(self.config.image_token_id)  # (B, T)
        table = self.get_input_embeddings()
        embeds = table(input_ids.masked_fill(is_image, 0))  # (B, T, d); the slots are overwritten below
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return embeds
        if pixel_values is None:
            raise ValueError(f"{n_slots} image slots in input_ids but no pixel_values")
        visual = self.get_image_features(pixel_values).reshape(-1, embeds.shape[-1])  # (M*N, d)
        if visual.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image slots in input_ids but {visual.shape[0]} visual tokens "
                             f"({self.config.num_image_tokens} per image)")
        return embeds.masked_scatter(is_image.unsqueeze(-1).to(embeds.device), visual.to(embeds.device, embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """As the LLM's forward, with `pixel_values` for the image slots of `input_ids`. During generation only the
        prompt step has image slots: later steps' new tokens never do, so the images are encoded once."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: Any, *args: Any, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        parent: Any = super()
        inputs = parent.prepare_inputs_for_generation(input_ids, *args, **kwargs)
        ids = inputs.get("input_ids")
        if pixel_values is not None and ids is not None and bool(ids.eq(self.config.image_token_id).any()):
            inputs["pixel_values"] = pixel_values  # the prompt step: its image slots are still to fill
        return inputs


__all__ = ["FedNanoForConditionalGeneration"]

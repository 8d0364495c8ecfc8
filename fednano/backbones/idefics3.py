"""Idefics3 (SmolVLM and friends): a SigLIP-style vision transformer -> pixel shuffle + one linear projection -> Llama.

The client holds the vision transformer and the connector (`Idefics3Connector`: the pixel shuffle that folds
scale_factor^2 neighbouring patches into one token, then `modality_projection.proj`); the server holds the text
model and its head. Each image is one square image at the checkpoint's resolution (no image splitting): it becomes
(image_size / patch_size)^2 / scale_factor^2 visual tokens, which the HF model puts at its image tokens in order,
as the NanoEdge puts them at the image slots. An export folds NanoAdapter-I into `modality_projection.proj`.

A backbone in one file: this subclass of HFMLLM and its line in registry.BACKBONES (tests/test_idefics3.py checks
that the split model's loss and adapter gradients equal the unsplit HF model's). Standard library only at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fednano.backbones.registry import HFMLLM

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fednano.server.llm import ServerLLM


@dataclass(frozen=True)
class Idefics3(HFMLLM):
    """Idefics3ForConditionalGeneration (SmolVLM, Idefics3-8B): vision transformer + pixel-shuffle connector."""

    model_type: ClassVar[str] = "idefics3"

    def model_class(self) -> Any:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def config_class(self) -> Any:
        from transformers import Idefics3Config

        return Idefics3Config

    def visual_tokens(self, cfg: Any, where: Path | str) -> int:
        return int((cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor**2)

    def client_modules(self, model: Any) -> tuple[nn.Module, dict[str, Any]]:
        return model.model.vision_model, {"": model.model.connector}

    def random_client_modules(self, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

        return Idefics3VisionTransformer(cfg.vision_config), {"": Idefics3Connector(cfg)}

    def rebuild(self, cfg: Any, meta: dict, vision_sd: dict, conn_sd: dict) -> tuple[nn.Module, nn.Module]:
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

        from fednano.client.hf_vision import HFVisionTower

        tower = Idefics3VisionTransformer(cfg.vision_config)
        tower.load_state_dict(vision_sd)
        # every patch is real (a whole square image): the HF model's patch mask is all ones, as the tower's default
        encoder = HFVisionTower(tower, meta["image_size"], meta["image_mean"], meta["image_std"], feature_layer=None, drop_cls=False)
        connector = Idefics3Connector(cfg)
        connector.load_state_dict(conn_sd)
        return encoder, connector

    def server_llm(self, model: Any, dtype: torch.dtype) -> ServerLLM:
        from fednano.server.llm import ServerLLM

        model.model.vision_model = model.model.connector = None
        return ServerLLM(model, dtype, decoder=model.model.text_model, head=model.lm_head)

    def projector(self, model: Any) -> nn.Linear:
        return model.model.connector.modality_projection.proj

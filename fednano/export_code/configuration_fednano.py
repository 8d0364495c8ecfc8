"""The configuration of an exported FedNano MLLM: a causal LM (`text_config`), a vision encoder that pools
its feature map to a grid (`vision_config`), and the connector between them.

Written by `fednano export` into the model's folder; imports transformers only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig


class FedNanoConfig(PretrainedConfig):
    """text_config: the LLM's configuration. vision_config: {"type": "efficientnet-lite0" | "tiny-cnn",
    "feature_dim": C, "grid": g, "image_size": S, ("channels": C for tiny-cnn)}. image_token_id: the id whose
    positions in input_ids receive the visual tokens, g*g per image (`num_image_tokens`)."""

    model_type = "fednano"
    sub_configs: ClassVar[dict[str, Any]] = {"text_config": AutoConfig}

    def __init__(self, text_config: Any = None, vision_config: dict | None = None, image_token_id: int | None = None,
                 **kwargs: Any) -> None:
        if isinstance(text_config, dict):
            from transformers import CONFIG_MAPPING

            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        self.vision_config = dict(vision_config or {})
        self.image_token_id: int = -1 if image_token_id is None else int(image_token_id)  # -1: no image slots
        kwargs.setdefault("tie_word_embeddings", False)  # the composite ties nothing itself; its LLM says whether it ties its head
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return int(self.vision_config.get("grid", 1)) ** 2

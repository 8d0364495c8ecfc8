"""Prompts and images for an exported FedNano MLLM, as FedNano builds them: each `<image>` mark in the text becomes
`num_image_tokens` image slots; the text between marks is tokenized piece by piece without added special tokens
(the chat template already holds them); prompts of a batch are padded on the left, ready for `generate`.

Written by `fednano export` into the model's folder; imports torch and transformers only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


class FedNanoProcessor(ProcessorMixin):
    """image_processor + tokenizer. `system_prompt`: the task's system prompt the model was tuned with."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_token: str = "<image>", num_image_tokens: int = 1, system_prompt: str = "", **kwargs: Any) -> None:
        self.image_token, self.num_image_tokens, self.system_prompt = image_token, int(num_image_tokens), system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    def prompt_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(self.image_token)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            ids += self.tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
        return ids

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = "pt",
                 **kwargs: Any) -> BatchFeature:
        """text: one prompt or a list (the chat template applied, `<image>` where each image goes); images: every
        prompt's images in order (one image, or a list) -> input_ids, attention_mask (left-padded), pixel_values."""
        if text is None:
            raise ValueError("give text: the prompt, with an <image> mark where each image goes")
        prompts = [text] if isinstance(text, str) else list(text)
        flat = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        marks = sum(p.count(self.image_token) for p in prompts)
        if marks != len(flat):
            raise ValueError(f"{marks} {self.image_token} marks in the text but {len(flat)} images")
        seqs = [self.prompt_ids(p) for p in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), int(pad), dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, s in enumerate(seqs):  # left padding: every prompt ends where its answer starts
            ids[row, longest - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, longest - len(s):] = 1
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if flat:
            data["pixel_values"] = self.image_processor(flat)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)


__all__ = ["FedNanoProcessor"]

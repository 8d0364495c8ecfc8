"""Prompts in the LLM's chat template, with visual-token slots, and right-padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fednano.models.nanoedge import IMAGE_PLACEHOLDER
from fednano.models.server_llm import IGNORE_INDEX

IMAGE_MARK = "<image>"
SYSTEM_PROMPT = "Answer the question about the image with one word."
END_OF_TURN = "<|im_end|>"


def prompt_ids(tokenizer: Any, question: str, n_visual: int, system: str = SYSTEM_PROMPT) -> list[int]:
    """Chat-template prompt ending with the assistant header; `<image>` -> n_visual slots."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"{IMAGE_MARK}\n{question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_MARK)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before) + [IMAGE_PLACEHOLDER] * n_visual + enc(after)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The supervised continuation: the answer and the end-of-turn token."""
    return tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) with IMAGE_PLACEHOLDER runs
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) IGNORE_INDEX except answer tokens


def pad_batch(seqs: list[list[int]], labels: list[list[int]] | None, pad_id: int) -> TokenBatch:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if labels is not None:
            lab[i, : len(s)] = torch.tensor(labels[i])
    return TokenBatch(ids, mask, lab)


def training_batch(tokenizer: Any, questions: list[str], answers: list[str], n_visual: int, system: str = SYSTEM_PROMPT) -> TokenBatch:
    seqs, labs = [], []
    for q, a in zip(questions, answers, strict=True):
        p, t = prompt_ids(tokenizer, q, n_visual, system), answer_ids(tokenizer, a)
        seqs.append(p + t)
        labs.append([IGNORE_INDEX] * len(p) + t)
    return pad_batch(seqs, labs, pad_id(tokenizer))


def prompt_batch(tokenizer: Any, questions: list[str], n_visual: int) -> TokenBatch:
    return pad_batch([prompt_ids(tokenizer, q, n_visual) for q in questions], None, pad_id(tokenizer))


def candidate_batch(tokenizer: Any, answers: list[str]) -> TokenBatch:
    return pad_batch([answer_ids(tokenizer, a) for a in answers], None, pad_id(tokenizer))


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid)

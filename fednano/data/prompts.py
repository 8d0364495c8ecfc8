"""Prompts in the LLM's chat template, with visual-token slots, and right-padded batches.

This is the batch format both sides agree on: input ids with IMAGE_PLACEHOLDER runs where the
client puts visual tokens, and labels that are IGNORE_INDEX except at the answer's tokens. The
system prompt is the task's (`Task.system`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fednano.data.samples import IMAGE_MARK

# Marks the positions of visual tokens in input ids (LLaVA uses -200 the same way).
IMAGE_PLACEHOLDER = -200
# Labels of positions that carry no loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

CHATML_END = "<|im_end|>"


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn(tokenizer: Any) -> str:
    """ChatML's <|im_end|> where the tokenizer knows it, else its EOS (LLaVA-1.5's </s>)."""
    vocab = tokenizer.get_vocab()
    return CHATML_END if CHATML_END in vocab else str(tokenizer.eos_token)


def stop_tokens(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the end-of-turn token and EOS."""
    return sorted({tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id} - {None})


def prompt_text(tokenizer: Any, content: str, system: str) -> str:
    """The tokenizer's chat template; without one, LLaVA-1.5's plain 'USER: ... ASSISTANT:' format."""
    if _has_template(tokenizer):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system} USER: {content} ASSISTANT:"


def prompt_ids(tokenizer: Any, content: str, n_visual: int, system: str) -> list[int]:
    """Prompt ending where the answer starts; each `<image>` mark in `content` becomes
    n_visual slots, as HF's LLaVA / BLIP-2 processors expand their image token."""
    parts = prompt_text(tokenizer, content, system).split(IMAGE_MARK)
    ids = [tokenizer.bos_token_id] if not _has_template(tokenizer) and tokenizer.bos_token_id is not None else []
    for i, part in enumerate(parts):
        if i:
            ids += [IMAGE_PLACEHOLDER] * n_visual
        ids += tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
    return ids


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The supervised continuation: the answer and the end-of-turn token."""
    lead = "" if _has_template(tokenizer) else " "  # after "ASSISTANT:" comes a space
    return tokenizer(lead + answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]


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


def training_batch(tokenizer: Any, contents: list[str], answers: list[str], n_visual: int, system: str) -> TokenBatch:
    """contents: user messages with their `<image>` marks (Sample.content())."""
    seqs, labs = [], []
    for q, a in zip(contents, answers, strict=True):
        p, t = prompt_ids(tokenizer, q, n_visual, system), answer_ids(tokenizer, a)
        seqs.append(p + t)
        labs.append([IGNORE_INDEX] * len(p) + t)
    return pad_batch(seqs, labs, pad_id(tokenizer))


def prompt_batch(tokenizer: Any, contents: list[str], n_visual: int, system: str) -> TokenBatch:
    return pad_batch([prompt_ids(tokenizer, q, n_visual, system) for q in contents], None, pad_id(tokenizer))


def candidate_batch(tokenizer: Any, answers: list[str]) -> TokenBatch:
    return pad_batch([answer_ids(tokenizer, a) for a in answers], None, pad_id(tokenizer))


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid)

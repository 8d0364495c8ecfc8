"""easy-vqa (ships inside its package): 64x64 shape images, questions, 13 answers."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A data file or sample is malformed; the message names the file or sample."""


@dataclass(frozen=True)
class Sample:
    question: str
    answer: str
    image_path: str
    image_id: str  # e.g. "train/17"


@lru_cache(maxsize=2)
def load_split(split: str) -> tuple[Sample, ...]:
    from easy_vqa import get_test_image_paths, get_test_questions, get_train_image_paths, get_train_questions

    if split == "train":
        texts, answers, ids = get_train_questions()
        paths = get_train_image_paths()
    elif split == "test":
        texts, answers, ids = get_test_questions()
        paths = get_test_image_paths()
    else:
        raise ValueError(f"unknown easy-vqa split {split!r}")
    return tuple(Sample(q, a, paths[i], f"{split}/{i}") for q, a, i in zip(texts, answers, ids, strict=True))


def answer_set() -> list[str]:
    from easy_vqa import get_answers

    return list(get_answers())


def vocabulary_words() -> list[str]:
    """Every word of easy-vqa's questions and answers (for tiny test tokenizers)."""
    words: set[str] = set()
    for split in ("train", "test"):
        for s in load_split(split):
            words.update(re.findall(r"\w+|[^\w\s]+", (s.question + " " + s.answer).lower()))
    return sorted(words)


SHAPES = ("circle", "rectangle", "triangle")


def captions(samples: tuple[Sample, ...], image_ids: set[str]) -> dict[str, tuple[str, str]]:
    """(image_path, caption) per image, from its own shape/colour questions (stage-1 data)."""
    colours = set(answer_set()) - set(SHAPES) - {"yes", "no"}
    shape: dict[str, str] = {}
    colour: dict[str, str] = {}
    path: dict[str, str] = {}
    for s in samples:
        if s.image_id not in image_ids:
            continue
        path[s.image_id] = s.image_path
        if s.answer in SHAPES:
            shape[s.image_id] = s.answer
        elif s.answer in colours:
            colour[s.image_id] = s.answer
    out = {}
    for i in sorted(path):
        parts = [p for p in (colour.get(i), shape.get(i)) if p]
        if parts:
            out[i] = (path[i], "A " + " ".join(parts) + ".")
    return out


def held_out_image_ids(n: int, seed: int) -> set[str]:
    """Train images reserved for connector pre-training; clients never see them."""
    ids = sorted({s.image_id for s in load_split("train")}, key=lambda x: int(x.split("/")[1]))
    return set(random.Random(seed).sample(ids, min(n, len(ids))))


def load_image(path: str) -> torch.Tensor:
    """A PNG -> (3, H, W) uint8; a missing or unreadable file names the path."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)

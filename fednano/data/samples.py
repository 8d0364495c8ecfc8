"""The one sample type every dataset produces, and the task description around it.

A sample's `question` is the user message. It may contain `<image>` marks where
its images go (in order); if it has none, one mark per image is put in front.
Answers are scored against a named candidate set of the task: easy-vqa's 13
answers, option letters (only the first `n_choices` are valid for a sample), or
the closed set of fill-in-the-blank answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fednano.errors import UserError

IMAGE_MARK = "<image>"


class DataError(UserError, ValueError):
    """A data file or sample is malformed; the message names the file or sample."""

LETTERS = tuple("ABCDEFGHIJ")


@dataclass(frozen=True)
class Sample:
    uid: str  # names the sample in errors and reports, e.g. "scienceqa/train/1234"
    question: str
    answer: str
    images: tuple[str, ...] = ()
    candidates: str = "answers"  # which candidate set of the task scores it
    n_choices: int = 0  # > 0: only the first n candidates are valid (multiple choice)
    meta: tuple[tuple[str, str], ...] = ()  # category fields: subject, grade, subtask, ...

    @property
    def image_path(self) -> str:
        return self.images[0]

    def get(self, key: str, default: str = "") -> str:
        if key == "answer":
            return self.answer
        return dict(self.meta).get(key, default)

    def content(self) -> str:
        """The user message with exactly one `<image>` mark per image."""
        marks = self.question.count(IMAGE_MARK)
        if marks == 0 and self.images:
            return f"{IMAGE_MARK}\n" * len(self.images) + self.question
        if marks != len(self.images):
            raise ValueError(f"sample {self.uid}: {marks} image marks for {len(self.images)} images")
        return self.question


@dataclass
class Task:
    """A dataset ready for federated tuning: train pool, global test set, scoring."""

    name: str
    train: list[Sample]
    test: list[Sample]
    candidate_sets: dict[str, list[str]]
    system: str
    categories: tuple[str, ...] = ()  # meta keys reported as per-category accuracy
    skipped: dict[str, str] = field(default_factory=dict)  # uid -> reason (skip_invalid)
    # candidate set -> how a free-form answer to its samples is normalised (data.answers; default: VQA's)
    normalisers: dict[str, Callable[[str], str]] = field(default_factory=dict)
    validation: list[Sample] = field(default_factory=list)  # held out of the train pool (data.validation_samples)


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

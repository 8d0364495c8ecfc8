"""easy-vqa (ships inside its package): 64x64 shape images, questions, 13 answers."""

from __future__ import annotations

import random
import re
from functools import lru_cache

from fednano.data.samples import DataError, Sample, Task, load_image  # noqa: F401 - re-exported


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
    return tuple(
        Sample(f"easy-vqa/{split}/{n}", q, a, (paths[i],), meta=(("image", f"{split}/{i}"),))
        for n, (q, a, i) in enumerate(zip(texts, answers, ids, strict=True))
    )


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
    """(image_path, caption) per image id, from its own shape/colour questions (stage-1 data)."""
    colours = set(answer_set()) - set(SHAPES) - {"yes", "no"}
    shape: dict[str, str] = {}
    colour: dict[str, str] = {}
    path: dict[str, str] = {}
    for s in samples:
        image = s.get("image")
        if image not in image_ids:
            continue
        path[image] = s.image_path
        if s.answer in SHAPES:
            shape[image] = s.answer
        elif s.answer in colours:
            colour[image] = s.answer
    out = {}
    for i in sorted(path):
        parts = [p for p in (colour.get(i), shape.get(i)) if p]
        if parts:
            out[i] = (path[i], "A " + " ".join(parts) + ".")
    return out


def held_out_image_ids(n: int, seed: int) -> set[str]:
    """Train images reserved for connector pre-training; clients never see them."""
    ids = sorted({s.get("image") for s in load_split("train")}, key=lambda x: int(x.split("/")[1]))
    return set(random.Random(seed).sample(ids, min(n, len(ids))))


SYSTEM_PROMPT = "Answer the question about the image with one word."


def easyvqa_task(data_cfg, caption_images: int, prepare_seed: int) -> Task:
    """Clients share the train questions of images not held out for connector pre-training;
    the test split is easy-vqa's."""
    held = held_out_image_ids(caption_images, prepare_seed)
    pool = [s for s in load_split("train") if s.get("image") not in held]
    return Task("easy-vqa", pool, list(load_split("test")), {"answers": answer_set()}, SYSTEM_PROMPT)

"""Datasets, prompts and federated partitions.

`load_task(cfg)` is the one entry point: it returns the train pool the clients
partition, the global test set, and how answers are scored.
"""

from __future__ import annotations

import importlib
import random
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fednano.data.samples import Task


class Dataset(NamedTuple):
    """A dataset's loader: its module, the function there that builds its Task, its system prompt's name there, and
    whether it reads files at data.path (easy-vqa ships inside its package). Modules are imported when used: each pulls
    in its own dependencies (pyarrow for parquet, the easy-vqa package); this package imports only the standard
    library, so that config.py takes the names from here."""

    module: str
    builder: str
    system: str
    needs_path: bool = True


# One entry per dataset (config.py validates data.dataset against these names).
DATASETS: dict[str, Dataset] = {
    "easy-vqa": Dataset("fednano.data.easyvqa", "easyvqa_task", "SYSTEM_PROMPT", needs_path=False),
    "scienceqa": Dataset("fednano.data.scienceqa", "scienceqa_task", "SYSTEM"),
    "iconqa": Dataset("fednano.data.iconqa", "iconqa_task", "SYSTEM"),
    "llava-json": Dataset("fednano.data.llava_json", "llava_json_task", "SYSTEM"),
}


def load_task(cfg) -> Task:
    return _load_task(cfg.data.to_key(), cfg.prepare.caption_images, cfg.prepare.seed)


def system_prompt(dataset: str) -> str:
    """The system prompt a dataset's questions are asked with (without loading its data)."""
    module, _, name, _ = DATASETS[dataset]
    return str(getattr(importlib.import_module(module), name))


@lru_cache(maxsize=4)
def _load_task(data_key: str, caption_images: int, prepare_seed: int) -> Task:
    import json

    from fednano.config import DataConfig

    d = DataConfig(**json.loads(data_key))
    module, builder, _, _ = DATASETS[d.dataset]
    # easy-vqa holds out the connector's caption images from the pool; the others ignore them
    task = getattr(importlib.import_module(module), builder)(d, caption_images, prepare_seed)
    if d.global_test_samples and d.global_test_samples < len(task.test):
        task.test = random.Random(f"{d.seed}-global-test").sample(task.test, d.global_test_samples)
    if d.validation_samples:
        task.train, task.validation = hold_out(task.train, d.validation_samples, f"{d.seed}-validation")
    return task


def hold_out(pool: list, n: int, seed: str) -> tuple[list, list]:
    """(the pool without n seeded random samples, those samples); both keep the pool's order."""
    from fednano.data.samples import DataError

    if n >= len(pool):
        raise DataError(f"data.validation_samples={n}: the training pool holds only {len(pool)} samples; hold out fewer")
    chosen = set(random.Random(seed).sample(range(len(pool)), n))
    return [s for i, s in enumerate(pool) if i not in chosen], [s for i, s in enumerate(pool) if i in chosen]

"""Datasets, prompts and federated partitions.

`load_task(cfg)` is the one entry point: it returns the train pool the clients
partition, the global test set, and how answers are scored.
"""

from __future__ import annotations

import importlib
import random
from functools import lru_cache

from fednano import config
from fednano.data.samples import DataError, Task

# dataset name -> (its module, the function that builds its Task, its system prompt's name there). Modules
# are imported when used: each pulls in its own dependencies (pyarrow for parquet, the easy-vqa package).
DATASETS: dict[str, tuple[str, str, str]] = {
    "easy-vqa": ("fednano.data.easyvqa", "easyvqa_task", "SYSTEM_PROMPT"),
    "scienceqa": ("fednano.data.scienceqa", "scienceqa_task", "SYSTEM"),
    "iconqa": ("fednano.data.iconqa", "iconqa_task", "SYSTEM"),
    "llava-json": ("fednano.data.llava_json", "llava_json_task", "SYSTEM"),
}

if tuple(DATASETS) != config.DATASETS:
    raise RuntimeError(f"config.DATASETS {config.DATASETS} and fednano.data.DATASETS {tuple(DATASETS)} disagree")


def load_task(cfg) -> Task:
    return _load_task(cfg.data.to_key(), cfg.prepare.caption_images, cfg.prepare.seed)


def system_prompt(dataset: str) -> str:
    """The system prompt a dataset's questions are asked with (without loading its data)."""
    module, _, name = DATASETS[dataset]
    return str(getattr(importlib.import_module(module), name))


@lru_cache(maxsize=4)
def _load_task(data_key: str, caption_images: int, prepare_seed: int) -> Task:
    import json

    from fednano.config import DataConfig

    d = DataConfig(**json.loads(data_key))
    module, builder, _ = DATASETS[d.dataset]
    # easy-vqa holds out the connector's caption images from the pool; the others ignore them
    task = getattr(importlib.import_module(module), builder)(d, caption_images, prepare_seed)
    if d.global_test_samples and d.global_test_samples < len(task.test):
        task.test = random.Random(f"{d.seed}-global-test").sample(task.test, d.global_test_samples)
    if d.validation_samples:
        task.train, task.validation = hold_out(task.train, d.validation_samples, f"{d.seed}-validation")
    return task


def hold_out(pool: list, n: int, seed: str) -> tuple[list, list]:
    """(the pool without n seeded random samples, those samples); both keep the pool's order."""
    if n >= len(pool):
        raise DataError(f"data.validation_samples={n}: the training pool holds only {len(pool)} samples; hold out fewer")
    chosen = set(random.Random(seed).sample(range(len(pool)), n))
    return [s for i, s in enumerate(pool) if i not in chosen], [s for i, s in enumerate(pool) if i in chosen]

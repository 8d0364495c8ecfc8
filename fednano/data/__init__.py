"""Datasets, prompts and federated partitions.

`load_task(cfg)` is the one entry point: it returns the train pool the clients
partition, the global test set, and how answers are scored.
"""

from __future__ import annotations

import random
from functools import lru_cache

from fednano.data.samples import Task


def load_task(cfg) -> Task:
    return _load_task(cfg.data.to_key(), cfg.prepare.caption_images, cfg.prepare.seed)


@lru_cache(maxsize=4)
def _load_task(data_key: str, caption_images: int, prepare_seed: int) -> Task:
    import json

    from fednano.config import DataConfig

    d = DataConfig(**json.loads(data_key))
    if d.dataset == "easy-vqa":
        from fednano.data.easyvqa import easyvqa_task

        task = easyvqa_task(d, caption_images, prepare_seed)
    elif d.dataset == "scienceqa":
        from fednano.data.scienceqa import scienceqa_task

        task = scienceqa_task(d)
    elif d.dataset == "iconqa":
        from fednano.data.iconqa import iconqa_task

        task = iconqa_task(d)
    else:
        from fednano.data.llava_json import llava_json_task

        task = llava_json_task(d)
    if d.global_test_samples and d.global_test_samples < len(task.test):
        task.test = random.Random(f"{d.seed}-global-test").sample(task.test, d.global_test_samples)
    return task

"""Federated partitions: which samples each client holds, and its local test split.

Non-IID splits use flwr-datasets' DirichletPartitioner over the answer label
(IidPartitioner for IID). Everything is a pure function of (samples, config):
every client process recomputes the same partition from the same seed.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from fednano.config import DataConfig
from fednano.data.easyvqa import DataError, Sample, held_out_image_ids, load_split


@dataclass
class ClientData:
    train: list[Sample]
    test: list[Sample]

    def label_histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(s.answer for s in self.train).items()))


def partition_indices(labels: list[str], cfg: DataConfig) -> list[list[int]]:
    """Indices of each client's samples (flwr-datasets partitioners on an in-memory Dataset)."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    ds = datasets.Dataset.from_dict({"idx": list(range(len(labels))), cfg.partition_by: labels})
    if cfg.partitioner == "iid":
        part = IidPartitioner(num_partitions=cfg.num_clients)
    else:
        part = DirichletPartitioner(
            num_partitions=cfg.num_clients, partition_by=cfg.partition_by, alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, shuffle=True, seed=cfg.seed,
        )
    part.dataset = ds
    try:
        return [list(part.load_partition(i)["idx"]) for i in range(cfg.num_clients)]
    except ValueError as e:
        raise DataError(
            f"cannot split {len(labels)} samples into data.num_clients={cfg.num_clients} partitions with "
            f"data.dirichlet_alpha={cfg.dirichlet_alpha} and data.min_partition_size={cfg.min_partition_size}: {e}"
        ) from None


def federated_pool(held_out_images: int, prepare_seed: int) -> list[Sample]:
    """easy-vqa train questions whose image was not used to pre-train the connector."""
    held = held_out_image_ids(held_out_images, prepare_seed)
    return [s for s in load_split("train") if s.image_id not in held]


def split_clients(pool: list[Sample], cfg: DataConfig) -> list[ClientData]:
    parts = partition_indices([s.answer for s in pool], cfg)
    clients = []
    for cid, idx in enumerate(parts):
        rng = random.Random(f"{cfg.seed}-local-test-{cid}")
        idx = list(idx)
        rng.shuffle(idx)
        n_test = max(1, min(cfg.max_local_test, round(len(idx) * cfg.local_test_fraction)))
        clients.append(ClientData(train=[pool[i] for i in idx[n_test:]], test=[pool[i] for i in idx[:n_test]]))
    return clients


def global_test_set(cfg: DataConfig) -> list[Sample]:
    test = list(load_split("test"))
    if cfg.global_test_samples and cfg.global_test_samples < len(test):
        test = random.Random(f"{cfg.seed}-global-test").sample(test, cfg.global_test_samples)
    return test

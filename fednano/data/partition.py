"""Federated partitions: which samples each client holds, and its local test split.

flwr-datasets' partitioners on an in-memory Dataset of partition keys:
IidPartitioner, DirichletPartitioner over `partition_by` (answer, subject,
subtask, ...), NaturalIdPartitioner (one client per value of the key).
Everything is a pure function of (samples, config): every client process
computes the same partition from the same seed. A deployed node without a warm
worker starts a fresh process per message, so the indices are also kept on the node's disk
(`<cache_dir>/partitions/`), keyed by a hash of the partition keys and of the
settings they depend on: a changed dataset or setting is a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fednano.config import DataConfig, RunConfig
from fednano.data import load_task
from fednano.data.samples import DataError, Sample


@dataclass
class ClientData:
    train: list[Sample]
    test: list[Sample]

    def histogram(self, key: str) -> dict[str, int]:
        return dict(sorted(Counter(s.get(key) for s in self.train).items()))

    def label_histogram(self) -> dict[str, int]:
        return self.histogram("answer")


def partition_indices(labels: list[str], cfg: DataConfig) -> list[list[int]]:
    """Indices of each client's samples."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    ds = datasets.Dataset.from_dict({"idx": list(range(len(labels))), "key": labels})
    if cfg.partitioner == "iid":
        part = IidPartitioner(num_partitions=cfg.num_clients)
    elif cfg.partitioner == "natural":
        values = sorted(set(labels))
        if len(values) != cfg.num_clients:
            raise DataError(f"natural partition by {cfg.partition_by!r} gives {len(values)} clients ({values}) but "
                            f"data.num_clients={cfg.num_clients}")
        part = NaturalIdPartitioner(partition_by="key")
    else:
        part = DirichletPartitioner(
            num_partitions=cfg.num_clients, partition_by="key", alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, shuffle=True, seed=cfg.seed,
        )
    part.dataset = ds
    try:
        parts = [list(part.load_partition(i)["idx"]) for i in range(cfg.num_clients)]
    except ValueError as e:
        raise DataError(
            f"cannot split {len(labels)} samples into data.num_clients={cfg.num_clients} partitions with "
            f"data.dirichlet_alpha={cfg.dirichlet_alpha} and data.min_partition_size={cfg.min_partition_size}: {e}"
        ) from None
    small = [i for i, p in enumerate(parts) if len(p) < cfg.min_partition_size]
    if small:
        raise DataError(f"clients {small} get fewer than data.min_partition_size={cfg.min_partition_size} samples "
                        f"({[len(parts[i]) for i in small]}) with data.partitioner={cfg.partitioner!r}")
    return parts


def cached_partition_indices(labels: list[str], cfg: DataConfig, cache: Path | None) -> list[list[int]]:
    """partition_indices, kept in `cache` (a folder; None: not kept). A file that does not hold a
    partition of these samples (truncated, edited) is computed again and replaced."""
    if cache is None:
        return partition_indices(labels, cfg)
    settings = [cfg.partitioner, cfg.partition_by, cfg.num_clients, cfg.dirichlet_alpha, cfg.min_partition_size, cfg.seed]
    digest = hashlib.sha256(json.dumps([settings, labels]).encode()).hexdigest()[:16]
    path = cache / "partitions" / f"{digest}.json"
    try:
        parts = json.loads(path.read_text())
        flat = [i for p in parts for i in p]
        if len(parts) == cfg.num_clients and len(set(flat)) == len(flat) and all(type(i) is int and 0 <= i < len(labels) for i in flat):
            return parts
    except (OSError, ValueError, TypeError):
        pass
    parts = partition_indices(labels, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # nodes sharing a disk may write at once: each its own file, then a rename
    tmp.write_text(json.dumps(parts))
    os.replace(tmp, path)
    return parts


def split_clients(pool: list[Sample], cfg: DataConfig, cache: Path | None = None) -> list[ClientData]:
    labels = [s.get(cfg.partition_by) for s in pool]
    missing = [s.uid for s, v in zip(pool, labels, strict=True) if not v]
    if missing:
        raise DataError(f"data.partition_by={cfg.partition_by!r}: samples without that field, e.g. {missing[:3]}")
    parts = cached_partition_indices(labels, cfg, cache)
    clients = []
    for cid, idx in enumerate(parts):
        rng = random.Random(f"{cfg.seed}-local-test-{cid}")
        idx = list(idx)
        rng.shuffle(idx)
        n_test = max(1, min(cfg.max_local_test, round(len(idx) * cfg.local_test_fraction)))
        clients.append(ClientData(train=[pool[i] for i in idx[n_test:]], test=[pool[i] for i in idx[:n_test]]))
    return clients


def summary(clients: list[ClientData], key: str) -> list[dict]:
    """Per client: sizes and the histogram of the partition key (written to partition.json)."""
    return [{"client": i, "train": len(c.train), "test": len(c.test), key: c.histogram(key)} for i, c in enumerate(clients)]


_PARTS: dict[str, list[ClientData]] = {}


def partitions(cfg: RunConfig) -> list[ClientData]:
    """Every client's data for a run config, computed identically by every process from the config
    (and cached per process)."""
    key = json.dumps([cfg.data.to_key(), cfg.prepare.caption_images, cfg.prepare.seed])
    if key not in _PARTS:
        _PARTS[key] = split_clients(load_task(cfg).train, cfg.data, cfg.model.resolved_cache_dir)
    return _PARTS[key]


def node_data(cfg: RunConfig) -> ClientData:
    """A node's own data (data.on_nodes; `cfg` carries its node config): every training sample of its task, and
    its test split, at most data.max_local_test of it (seeded)."""
    task = load_task(cfg)
    test = list(task.test)
    if len(test) > cfg.data.max_local_test:
        test = random.Random(f"{cfg.data.seed}-node-test").sample(test, cfg.data.max_local_test)
    return ClientData(list(task.train), test)


def client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    parts = partitions(cfg)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} out of range for {len(parts)} clients")
    return parts[partition_id]

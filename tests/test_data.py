import json

import pytest
import torch

from fednano.config import DataConfig, RunConfig
from fednano.data import hold_out, load_task
from fednano.data.easyvqa import SYSTEM_PROMPT, DataError, captions, easyvqa_task, held_out_image_ids, load_image, load_split
from fednano.data.partition import partitions, split_clients
from fednano.data.prompts import IGNORE_INDEX, IMAGE_PLACEHOLDER, answer_ids, prompt_ids, training_batch


def test_easyvqa_ships_its_data():
    train, test = load_split("train"), load_split("test")
    assert len(train) == 38_575 and len(test) == 9_673
    assert load_image(train[0].image_path).shape == (3, 64, 64)


def federated_pool(n, seed):
    return easyvqa_task(DataConfig(), n, seed).train


def test_held_out_images_never_reach_clients():
    held = held_out_image_ids(100, seed=3)
    pool = federated_pool(100, 3)
    assert len(held) == 100
    assert not {s.get("image") for s in pool} & held
    assert len(pool) < len(load_split("train"))


def test_captions_come_from_the_image_questions():
    train = load_split("train")
    img = train[0].get("image")
    caps = captions(train, {img})
    (path, text), = caps.values()
    answers = {s.answer for s in train if s.get("image") == img}
    assert path == train[0].image_path and text.startswith("A ")
    assert all(w in answers for w in text[2:-1].split())


def _cfg(**kw):
    base = dict(num_clients=4, dirichlet_alpha=0.3, min_partition_size=20, max_local_test=10, seed=5)
    return DataConfig(**{**base, **kw})


def test_dirichlet_partition_is_reproducible_disjoint_and_non_iid():
    pool = federated_pool(100, 0)[:4000]
    a, b = split_clients(pool, _cfg()), split_clients(pool, _cfg())
    assert [len(c.train) for c in a] == [len(c.train) for c in b]
    assert [c.train[:3] for c in a] == [c.train[:3] for c in b]
    seen = [id(s) for c in a for s in c.train + c.test]
    assert len(seen) == len(set(seen)) == 4000  # every sample exactly once
    assert all(len(c.train) + len(c.test) >= 20 for c in a)
    assert all(1 <= len(c.test) <= 10 for c in a)
    # alpha = 0.3 skews label histograms: the top label's share differs between clients
    shares = [max(c.label_histogram().values()) / len(c.train) for c in a]
    assert max(shares) - min(shares) > 0.05
    c = split_clients(pool, _cfg(seed=6))
    assert [len(x.train) for x in c] != [len(x.train) for x in a]


def test_a_node_keeps_its_partition_on_disk_and_recomputes_a_damaged_one(tmp_path, monkeypatch):
    """A deployed node starts a fresh process per message: the partition is read back from its disk,
    equal to the computed one; another setting is another file; a damaged file is computed again."""
    import fednano.data.partition as partition

    pool = federated_pool(100, 0)[:2000]
    fresh = split_clients(pool, _cfg())
    cached = split_clients(pool, _cfg(), tmp_path)
    (file,) = (tmp_path / "partitions").iterdir()
    calls = []
    real = partition.partition_indices
    monkeypatch.setattr(partition, "partition_indices", lambda labels, cfg: calls.append(1) or real(labels, cfg))
    again = split_clients(pool, _cfg(), tmp_path)
    assert calls == []  # read back, not computed
    assert [[s.uid for s in c.train + c.test] for c in again] == [[s.uid for s in c.train + c.test] for c in fresh]
    assert [[s.uid for s in c.train] for c in cached] == [[s.uid for s in c.train] for c in fresh]
    split_clients(pool, _cfg(dirichlet_alpha=0.5), tmp_path)
    assert len(list((tmp_path / "partitions").iterdir())) == 2 and calls == [1]
    for damage in ("[[0, 1], [1", "[[0, 0], [], [], []]", '[[0], [1], [2], [1e9]]', "[[0], [1]]"):
        file.write_text(damage)
        again = split_clients(pool, _cfg(), tmp_path)
        assert [[s.uid for s in c.train] for c in again] == [[s.uid for s in c.train] for c in fresh]
    assert len(calls) == 5 and json.loads(file.read_text())[0][:3] == real([s.answer for s in pool], _cfg())[0][:3]


def test_iid_partition_is_balanced():
    pool = federated_pool(100, 0)[:1000]
    parts = split_clients(pool, _cfg(partitioner="iid"))
    assert {len(p.train) + len(p.test) for p in parts} == {250}


def _test_set(n):
    cfg = RunConfig()
    cfg.data = DataConfig(global_test_samples=n)
    return load_task(cfg).test


def test_global_test_set_sampling():
    assert len(_test_set(50)) == 50
    assert _test_set(50) == _test_set(50)
    assert len(_test_set(0)) == 9_673


def test_validation_set_is_held_out_of_the_training_pool_before_partitioning():
    base, held = RunConfig(), RunConfig()
    held.data = DataConfig(validation_samples=300)
    pool, task = load_task(base).train, load_task(held)
    assert len(task.validation) == 300 and len(task.train) == len(pool) - 300
    uids = {s.uid for s in task.validation}
    assert uids.isdisjoint(s.uid for s in task.train) and uids <= {s.uid for s in pool}  # from the pool, never trained on
    assert not uids & {s.uid for p in partitions(held) for s in p.train + p.test}
    assert task.test == load_task(base).test  # the global test set is untouched
    assert hold_out(pool, 300, "0-validation")[1] == task.validation  # seeded by data.seed
    assert hold_out(pool, 300, "1-validation")[1] != task.validation
    with pytest.raises(DataError, match="data.validation_samples=.*holds only"):
        hold_out(pool[:10], 10, "s")


def test_prompt_has_visual_slots_and_labels_only_the_answer(tiny_edge):
    tok = tiny_edge.tokenizer
    ids = prompt_ids(tok, "<image>\nwhat shape is this?", 4, SYSTEM_PROMPT)
    assert ids.count(IMAGE_PLACEHOLDER) == 4
    assert prompt_ids(tok, "<image> or <image>?", 3, SYSTEM_PROMPT).count(IMAGE_PLACEHOLDER) == 6  # several images
    assert IMAGE_PLACEHOLDER not in prompt_ids(tok, "no image here", 3, SYSTEM_PROMPT)  # text-only sample
    batch = training_batch(tok, ["<image>\nwhat color is the shape?", "<image>\nis there a circle?"], ["blue", "no"], 4, SYSTEM_PROMPT)
    for i, ans in enumerate(["blue", "no"]):
        labelled = batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist()
        assert labelled == answer_ids(tok, ans)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image .*bad.png"):
        load_image(str(bad))


def test_embed_rejects_placeholder_feature_mismatch(tiny_edge):
    edge = tiny_edge.edge
    ids = torch.tensor([[5, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER, 6]])
    with pytest.raises(ValueError, match="2 image placeholders but 0 visual tokens"):
        edge.embed(ids, None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flwr-datasets warns on every redraw
def test_impossible_partition_names_the_settings():
    pool = federated_pool(100, 0)[:200]
    with pytest.raises(DataError, match="data.min_partition_size=150"):
        split_clients(pool, _cfg(num_clients=4, min_partition_size=150))

"""ScienceQA (official + parquet), IconQA (three sub-tasks) and LLaVA-JSON: loaders,
per-category metrics, malformed data, and a 2-client x 1-round run on each."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fednano.config import DataConfig
from fednano.data.iconqa import iconqa_task
from fednano.data.llava_json import llava_json_task
from fednano.data.samples import DataError, Sample
from fednano.data.scienceqa import scienceqa_task
from fednano.metrics import accuracy_report, by_category, merge_reports
from tests.conftest import ROOT, TINY
from tests.datasets import make_iconqa, make_llava_json, make_scienceqa_official, make_scienceqa_parquet


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDNANO_CACHE", str(tmp_path / "cache"))


def sqa(path, **kw):
    return scienceqa_task(DataConfig(dataset="scienceqa", path=str(path), **kw))


def test_scienceqa_official_layout(tmp_path):
    task = sqa(make_scienceqa_official(tmp_path / "sqa"))
    assert len(task.train) == 36 and len(task.test) == 12
    s = next(x for x in task.train if x.uid == "scienceqa/train/1001")
    assert s.question.startswith("Context: A shape is shown.\nWhich shape is number 1?\nA. circle\nB. triangle\nC. rectangle")
    assert s.answer == "B" and s.n_choices == 3 and s.candidates == "letters"
    assert dict(s.meta) == {"subject": "SOC", "context": "TXT|IMG", "grade": "G1-6"}
    no_image = next(x for x in task.train if x.uid == "scienceqa/train/1003")
    assert no_image.images == () and "<image>" not in no_image.content()  # text-only: no visual tokens
    assert task.categories == ("subject", "context", "grade")


def test_scienceqa_parquet_layout(tmp_path):
    task = sqa(make_scienceqa_parquet(tmp_path / "sqp"))
    assert len(task.train) == 40 and len(task.test) == 10
    with_image = [s for s in task.train if s.images]
    assert len(with_image) == 26
    with Image.open(with_image[0].images[0]) as im:  # decoded from the parquet bytes
        assert im.size == (64, 64)
    assert {s.get("subject") for s in task.train} == {"NAT", "SOC", "LAN"}


def test_iconqa_three_subtasks(tmp_path):
    task = iconqa_task(DataConfig(dataset="iconqa", path=str(make_iconqa(tmp_path / "icon"))))
    by_task = {t: [s for s in task.train if s.get("subtask") == t] for t in ("choose_txt", "choose_img", "fill_in_blank")}
    assert {t: len(v) for t, v in by_task.items()} == {"choose_txt": 12, "choose_img": 12, "fill_in_blank": 12}
    img = by_task["choose_img"][0]
    assert len(img.images) == 4 and img.content().count("<image>") == 4  # question image, then one per choice
    fill = by_task["fill_in_blank"][0]
    assert fill.candidates == "fill" and fill.n_choices == 0
    assert task.candidate_sets["fill"] == ["1", "2", "3"]
    only = iconqa_task(DataConfig(dataset="iconqa", path=str(tmp_path / "icon"), subtasks="fill_in_blank"))
    assert {s.get("subtask") for s in only.train} == {"fill_in_blank"}


def test_llava_json(tmp_path):
    task = llava_json_task(DataConfig(dataset="llava-json", path=str(make_llava_json(tmp_path / "llj"))))
    assert len(task.train) + len(task.test) == 40
    assert task.candidate_sets == {"answers": ["no", "yes"]}
    assert any(not s.images for s in task.train) and any(s.images for s in task.train)


def test_llava_json_as_llava_writes_it_images_in_their_own_folder_files_named_freely(tmp_path):
    """LLaVA's data names images relative to a separate --image_folder (data.image_folder), and the train and test
    files are any two files (data.path, data.test_path)."""
    src = make_llava_json(tmp_path / "src")
    records = json.loads(src.read_text())
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "my-train.json").write_text(json.dumps(records[:30]))
    (tmp_path / "json" / "held-out.json").write_text(json.dumps(records[30:]))
    (tmp_path / "pictures").mkdir()
    shutil.move(tmp_path / "src" / "images", tmp_path / "pictures" / "images")  # images/... no longer beside the JSON
    d = {"dataset": "llava-json", "path": str(tmp_path / "json" / "my-train.json"), "test_path": str(tmp_path / "json" / "held-out.json")}
    with pytest.raises(DataError, match=r"my-train.json \[entry 1, id conv-1\]: image file not found: .*json/images/1.png"):
        llava_json_task(DataConfig(**d))
    task = llava_json_task(DataConfig(**d, image_folder=str(tmp_path / "pictures")))
    assert (len(task.train), len(task.test)) == (30, 10)
    assert all(Path(p).is_file() and "pictures" in p for s in task.train + task.test for p in s.images)
    with pytest.raises(DataError, match="data.image_folder: .* is not a folder"):
        llava_json_task(DataConfig(**d, image_folder=str(tmp_path / "nowhere")))


def test_accuracy_report_per_category_hand_computed():
    samples = [Sample(str(i), "q", "A", meta=(("subject", subj), ("context", ctx)))
               for i, (subj, ctx) in enumerate([("NAT", "TXT|IMG"), ("NAT", "NO"), ("SOC", "IMG"), ("SOC", "TXT")])]
    rep = accuracy_report(samples, [True, False, True, True], ("subject", "context"))
    assert rep["accuracy"] == 0.75
    assert by_category(rep) == {"subject=NAT": 0.5, "subject=SOC": 1.0, "context=IMG": 1.0, "context=NO": 0.0, "context=TXT": 1.0}
    assert rep["n/context=TXT"] == 2 and rep["n/context=IMG"] == 2  # sample 0 counts in both
    merged = merge_reports([rep, accuracy_report(samples[:1], [False], ("subject",))])
    assert merged["accuracy"] == pytest.approx(3 / 5) and merged["acc/subject=NAT"] == pytest.approx(1 / 3)


# --- malformed data: a clear error naming the file and the sample; or skipped and reported ---
def _damage_problems(root, pid, **changes):
    problems = json.loads((root / "problems.json").read_text())
    for k, v in changes.items():
        if v is None:
            problems[pid].pop(k)
        else:
            problems[pid][k] = v
    (root / "problems.json").write_text(json.dumps(problems))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda r: (r / "images" / "train" / "1001" / "image.png").unlink(), r"image file not found: .*1001/image.png \(sample "
                                                                             r"scienceqa/train/1001"),
        (lambda r: (r / "images" / "train" / "1001" / "image.png").write_bytes(b"garbage"), r"unreadable image .*1001/image.png"),
        (lambda r: _damage_problems(r, "1002", answer=None), r"problems.json \[1002\]: missing field\(s\) \['answer'\]"),
        (lambda r: _damage_problems(r, "1002", answer=7), r"problems.json \[1002\]: answer index 7 out of range for 2 choices"),
    ],
)
def test_malformed_scienceqa_names_file_and_sample(tmp_path, damage, needle):
    root = make_scienceqa_official(tmp_path / "sqa")
    damage(root)
    with pytest.raises(DataError, match=needle):
        sqa(root)
    task = sqa(root, skip_invalid=True)
    assert len(task.skipped) == 1 and len(task.train) == 35
    (reason,) = task.skipped.values()
    assert reason and "sample" not in reason


def test_missing_data_files(tmp_path):
    with pytest.raises(DataError, match="ScienceQA directory not found"):
        sqa(tmp_path / "nowhere")
    root = make_scienceqa_official(tmp_path / "sqa")
    (root / "pid_splits.json").unlink()
    with pytest.raises(DataError, match=r"data file not found: .*pid_splits.json"):
        sqa(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no parquet file for split 'train'"):
        sqa(tmp_path / "empty")
    icon = make_iconqa(tmp_path / "icon")
    (icon / "iconqa" / "train" / "choose_txt" / "10000" / "data.json").unlink()
    with pytest.raises(DataError, match=r"data file not found: .*10000/data.json \(sample iconqa/train/choose_txt/10000"):
        iconqa_task(DataConfig(dataset="iconqa", path=str(icon)))
    with pytest.raises(DataError, match="IconQA folder not found"):
        iconqa_task(DataConfig(dataset="iconqa", path=str(tmp_path)))


def test_malformed_llava_json(tmp_path):
    path = make_llava_json(tmp_path / "llj")
    data = json.loads(path.read_text())
    data[3]["conversations"] = [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"data.json \[entry 3, id conv-3\]: the first two turns"):
        llava_json_task(DataConfig(dataset="llava-json", path=str(path)))
    path.write_text("[{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        llava_json_task(DataConfig(dataset="llava-json", path=str(path)))


# --- end to end: 2 clients x 1 round on each dataset -------------------------------
def _run(tiny_cache, out, sets):
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    args = [sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out), "--set", "federation.rounds=1",
            "--set", "data.min_partition_size=5"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("layout", ["official", "parquet"])
def test_run_scienceqa(tiny_bundle, tiny_cache, tmp_path, layout):
    root = (make_scienceqa_official if layout == "official" else make_scienceqa_parquet)(tmp_path / "sqa")
    if layout == "official":  # damage one sample: skipped and reported
        (root / "images" / "train" / "1001" / "image.png").write_bytes(b"garbage")
    res = _run(tiny_cache, tmp_path / "run", ["data.dataset='scienceqa'", f"data.path='{root}'", "data.skip_invalid=true",
                                              "data.partitioner='iid'"])
    cats = res["rounds"][0]["global_accuracy_by_category"]
    assert {"subject=NAT", "subject=SOC", "subject=LAN", "grade=G1-6"} <= set(cats)
    assert set(res["rounds"][0]["client_accuracy_by_category"]) == {"0", "1"}
    assert res["data"]["skipped"] == (1 if layout == "official" else 0)
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert len(part["clients"]) == 2 and (tmp_path / "run" / "partition.png").exists()
    assert "| category |" in (tmp_path / "run" / "table.md").read_text()


def test_run_scienceqa_natural_partition_by_subject(tiny_bundle, tiny_cache, tmp_path):
    root = make_scienceqa_official(tmp_path / "sqa", n=80)
    res = _run(tiny_cache, tmp_path / "run", ["data.dataset='scienceqa'", f"data.path='{root}'", "data.partitioner='natural'",
                                              "data.partition_by='subject'", "data.num_clients=3"])
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert [len(c["subject"]) for c in part["clients"]] == [1, 1, 1]  # one subject per client
    assert res["rounds"][0]["clients_accepted"] == 3


def test_run_iconqa(tiny_bundle, tiny_cache, tmp_path):
    root = make_iconqa(tmp_path / "icon", per_task=16)
    res = _run(tiny_cache, tmp_path / "run", ["data.dataset='iconqa'", f"data.path='{root}'", "data.partition_by='subtask'",
                                              "data.dirichlet_alpha=5.0"])
    assert set(res["rounds"][0]["global_accuracy_by_category"]) == {"subtask=choose_txt", "subtask=choose_img", "subtask=fill_in_blank"}


def test_run_llava_json(tiny_bundle, tiny_cache, tmp_path):
    path = make_llava_json(tmp_path / "llj", n=60)
    res = _run(tiny_cache, tmp_path / "run", ["data.dataset='llava-json'", f"data.path='{path}'", "data.partitioner='iid'"])
    assert res["rounds"][0]["clients_accepted"] == 2 and res["data"]["dataset"] == "llava-json"

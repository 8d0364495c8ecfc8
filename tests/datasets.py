"""Tiny ScienceQA / IconQA / LLaVA-JSON datasets in their published layouts (for tests).

Images are easy-vqa PNGs copied into place, so the tiny MLLM sees real pictures; like the
real ScienceQA, the official layout mixes image sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from fednano.data.easyvqa import load_split

SUBJECTS = ["natural science", "social science", "language science"]


def _images():
    return [s.image_path for s in load_split("train")[::10]]


def make_scienceqa_official(root: Path, n: int = 48) -> Path:
    imgs = _images()
    problems, splits = {}, {"train": [], "test": [], "val": []}
    for i in range(n):
        pid = str(1000 + i)
        split = "test" if i % 4 == 0 else "train"
        has_image = i % 3 != 0
        rec = {
            "question": f"Which shape is number {i}?", "choices": ["circle", "triangle", "rectangle"][: 2 + i % 2],
            "answer": i % (2 + i % 2), "hint": "A shape is shown." if i % 2 else "", "image": "image.png" if has_image else None,
            "subject": SUBJECTS[i % 3], "grade": f"grade{1 + i % 12}", "split": split,
        }
        problems[pid] = rec
        splits[split].append(pid)
        if has_image:
            (root / "images" / split / pid).mkdir(parents=True, exist_ok=True)
            if i % 5 == 1:  # real ScienceQA images come in every size
                with Image.open(imgs[i]) as im:
                    im.convert("RGB").resize((96 + i, 72)).save(root / "images" / split / pid / "image.png")
            else:
                shutil.copy(imgs[i], root / "images" / split / pid / "image.png")
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


def make_scienceqa_parquet(root: Path, n: int = 40) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = _images()
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, offset in (("train", 0), ("test", 1000)):
        rows = []
        for i in range(n if split == "train" else n // 4):
            k = i + offset
            image = {"bytes": Path(imgs[k % len(imgs)]).read_bytes(), "path": None} if i % 3 else None
            rows.append({"image": image, "question": f"Which is true {k}?", "choices": ["yes", "no", "maybe"], "answer": k % 3,
                         "hint": "" if i % 2 else "Look closely.", "subject": SUBJECTS[i % 3], "grade": f"grade{1 + i % 12}"})
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def make_iconqa(root: Path, per_task: int = 12) -> Path:
    imgs = _images()
    k = 0
    for split in ("train", "test"):
        for task in ("choose_txt", "choose_img", "fill_in_blank"):
            for _ in range(per_task if split == "train" else per_task // 3):
                qid = str(10_000 + k)
                folder = root / "iconqa" / split / task / qid
                folder.mkdir(parents=True)
                shutil.copy(imgs[k % len(imgs)], folder / "image.png")
                if task == "fill_in_blank":
                    rec = {"question": "How many shapes are there?", "answer": str(1 + k % 3), "ques_type": task, "grade": "prek"}
                else:
                    choices = ["one", "two", "three"]
                    if task == "choose_img":
                        choices = [f"choice_{j}.png" for j in range(3)]
                        for j, c in enumerate(choices):
                            shutil.copy(imgs[(k + j + 1) % len(imgs)], folder / c)
                    rec = {
                        "question": "Which one matches?",
                        "choices": choices,
                        "answer": k % 3,
                        "ques_type": task,
                        "grade": "kindergarten",
                    }
                (folder / "data.json").write_text(json.dumps(rec))
                k += 1
    return root


def make_llava_json(root: Path, n: int = 40) -> Path:
    imgs = _images()
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    data = []
    for i in range(n):
        rec = {
            "id": f"conv-{i}",
            "conversations": [
                {"from": "human", "value": f"{'<image>' + chr(10) if i % 4 else ''}Is there a shape?"},
                {"from": "gpt", "value": "yes" if i % 2 else "no"},
            ],
        }
        if i % 4:
            shutil.copy(imgs[i], root / "images" / f"{i}.png")
            rec["image"] = f"images/{i}.png"
        data.append(rec)
    (root / "data.json").write_text(json.dumps(data))
    return root / "data.json"

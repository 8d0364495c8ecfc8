"""LLaVA conversation JSON, the de-facto format for MLLM instruction data:

    [{"id": ..., "image": "relative/path.png",            # "image" optional
      "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}]

data.path is the JSON file (the training file when data.test_path names the test file); images are
resolved relative to data.image_folder, as LLaVA's own `--image_folder`, or else to each file's folder.
The first human/gpt exchange of each conversation becomes one sample (later turns are not used).
Evaluation scores the closed set of answers seen in the training file, so it is meaningful for short
answers; the training loss is reported for any data. Without data.test_path the train and test files
are `<stem>` + `_train.json` / `_test.json` next to data.path when they exist, else data.path is
split 90/10 by seed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from fednano.config import DataConfig
from fednano.data.checks import Collector, check_image, read_json
from fednano.data.samples import IMAGE_MARK, DataError, Sample, Task

SYSTEM = "You are a helpful assistant."


def load_llava_json(path: Path, check: Collector, image_folder: Path | None = None) -> list[Sample]:
    """The samples of one LLaVA JSON file; image paths relative to `image_folder` (default: the file's folder)."""
    records = read_json(path)
    folder = image_folder if image_folder is not None else path.parent
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of conversations")
    out = []
    for n, rec in enumerate(records):
        rid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
        uid, where = f"llava-json/{path.name}/{rid}", f"{path} [entry {n}, id {rid}]"
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            check.reject(uid, f"{where}: needs a 'conversations' list with a human and a gpt turn")
            continue
        human, gpt = conv[0], conv[1]
        if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human" and gpt.get("from") == "gpt"
                and isinstance(human.get("value"), str) and isinstance(gpt.get("value"), str)):
            check.reject(uid, f"{where}: the first two turns must be from 'human' and 'gpt' with string values")
            continue
        question = human["value"].strip()
        images: tuple[str, ...] = ()
        if rec.get("image"):
            img = folder / str(rec["image"])
            problem = check_image(img)
            if problem:
                check.reject(uid, f"{where}: {problem}")
                continue
            images = (str(img),)
            if IMAGE_MARK not in question:
                question = f"{IMAGE_MARK}\n{question}"
        elif IMAGE_MARK in question:
            check.reject(uid, f"{where}: {IMAGE_MARK} in the question but no 'image'")
            continue
        out.append(Sample(uid, question, gpt["value"].strip(), images))
    return out


def llava_json_task(d: DataConfig, *_: int) -> Task:  # (caption images, prepare seed): easy-vqa's only
    path = Path(os.path.expanduser(d.path))
    check = Collector(d.skip_invalid)
    folder = Path(os.path.expanduser(d.image_folder)) if d.image_folder else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"data.image_folder: {folder} is not a folder")
    train_file, test_file = path.with_name(path.stem + "_train.json"), path.with_name(path.stem + "_test.json")
    if d.test_path:
        train_file, test_file = path, Path(os.path.expanduser(d.test_path))
    if d.test_path or (train_file.exists() and test_file.exists()):
        train, test = load_llava_json(train_file, check, folder), load_llava_json(test_file, check, folder)
    else:
        samples = load_llava_json(path, check, folder)
        random.Random(f"{d.seed}-llava-split").shuffle(samples)
        cut = max(1, len(samples) // 10)
        test, train = samples[:cut], samples[cut:]
    if not train or not test:
        raise DataError(f"{path}: not enough valid conversations for a train and a test split")
    answers = sorted({s.answer for s in train})
    return Task("llava-json", train, test, {"answers": answers}, SYSTEM, (), check.skipped)

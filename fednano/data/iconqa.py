"""IconQA (Lu et al., 2021), official layout:

    <path>/iconqa/{train,val,test}/{choose_txt,choose_img,fill_in_blank}/{qid}/data.json
                                                               /image.png  (+ choice images)
    <path>/pid_splits.json   (optional: "{subtask}_{split}" -> question ids; else the folders are scanned)

data.json: question, choices (texts, or image file names for choose_img), answer
(the choice index; the answer text for fill_in_blank), ques_type, grade, ...

* choose_txt: lettered text options, scored as the option letter.
* choose_img: the question image first, then each choice image after its letter
  ("A. <image> B. <image> ..."), so a sample carries 1 + n images.
* fill_in_blank: scored by exact match of the best-scoring candidate from the closed
  set of answers seen in the training split (a test answer outside that set counts as
  wrong); with `data.scoring = "generate"` also by exact match of the generated answer
  after number normalisation (`data.answers.number_normalise`), which that set does not
  flatter.
"""

from __future__ import annotations

import os
from pathlib import Path

from fednano.config import DataConfig
from fednano.data.answers import choice_letter, number_normalise
from fednano.data.checks import Collector, check_image, read_json, require
from fednano.data.samples import LETTERS, DataError, Sample, Task

SUBTASKS = ("choose_txt", "choose_img", "fill_in_blank")
SYSTEM = "You are a helpful assistant. Answer questions about the diagrams."
CHOOSE = "Answer with the option's letter from the given choices directly."
FILL = "Answer the question using a single word or number."


def _qids(root: Path, split: str, subtask: str) -> list[str]:
    splits_file = root / "pid_splits.json"
    if splits_file.exists():
        splits = read_json(splits_file)
        key = f"{subtask}_{split}"
        if key in splits:
            return [str(q) for q in splits[key]]
    folder = root / "iconqa" / split / subtask
    return sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda x: (len(x), x)) if folder.is_dir() else []


def _sample(root: Path, split: str, subtask: str, qid: str, check: Collector) -> Sample | None:
    folder = root / "iconqa" / split / subtask / qid
    uid = f"iconqa/{split}/{subtask}/{qid}"
    if not (folder / "data.json").exists():
        check.reject(uid, f"data file not found: {folder / 'data.json'}")
        return None
    try:
        rec = read_json(folder / "data.json")
    except DataError as e:
        check.reject(uid, str(e))
        return None
    where = str(folder / "data.json")
    problem = require(rec, ("question", "answer") + (("choices",) if subtask != "fill_in_blank" else ()), where)
    if problem:
        check.reject(uid, problem)
        return None
    images = [folder / "image.png"]
    meta = (("subtask", subtask), ("grade", str(rec.get("grade", ""))))
    question = str(rec["question"])
    if subtask == "fill_in_blank":
        text, answer, cands, n = f"{question}\n{FILL}", str(rec["answer"]).strip(), "fill", 0
    else:
        choices, answer_idx = list(rec["choices"]), rec["answer"]
        if not 2 <= len(choices) <= len(LETTERS):
            check.reject(uid, f"{where}: {len(choices)} choices (need 2 to {len(LETTERS)})")
            return None
        if not isinstance(answer_idx, int) or not 0 <= answer_idx < len(choices):
            check.reject(uid, f"{where}: answer index {answer_idx!r} out of range for {len(choices)} choices")
            return None
        if subtask == "choose_img":
            images += [folder / str(c) for c in choices]
            options = " ".join(f"{LETTERS[i]}. <image>" for i in range(len(choices)))
            text = f"<image>\n{question}\nOptions: {options}\n{CHOOSE}"
        else:
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
            text = f"{question}\n{options}\n{CHOOSE}"
        answer, cands, n = LETTERS[answer_idx], "letters", len(choices)
    for img in images:
        problem = check_image(img)
        if problem:
            check.reject(uid, problem)
            return None
    return Sample(uid, text, answer, tuple(str(p) for p in images), candidates=cands, n_choices=n, meta=meta)


def load_iconqa(path: str, split: str, subtasks: tuple[str, ...], check: Collector) -> list[Sample]:
    root = Path(os.path.expanduser(path))
    if not (root / "iconqa").is_dir():
        raise DataError(f"IconQA folder not found: {root / 'iconqa'} (data.path should be the iconqa_data directory)")
    out = []
    for subtask in subtasks:
        for qid in _qids(root, split, subtask):
            sample = _sample(root, split, subtask, qid, check)
            if sample:
                out.append(sample)
    return out


def iconqa_task(d: DataConfig, *_: int) -> Task:  # (caption images, prepare seed): easy-vqa's only
    subtasks = tuple(s.strip() for s in d.subtasks.split(",") if s.strip())
    unknown = set(subtasks) - set(SUBTASKS)
    if unknown or not subtasks:
        raise DataError(f"data.subtasks: unknown sub-task(s) {sorted(unknown)}; choose from {list(SUBTASKS)}")
    check = Collector(d.skip_invalid)
    train, test = load_iconqa(d.path, d.train_split, subtasks, check), load_iconqa(d.path, d.test_split, subtasks, check)
    if not train or not test:
        raise DataError(f"{d.path}: no valid IconQA samples in split {d.train_split if not train else d.test_split!r}")
    fill = sorted({s.answer for s in train if s.candidates == "fill"})
    return Task("iconqa", train, test, {"letters": list(LETTERS), "fill": fill}, SYSTEM, ("subtask",), check.skipped,
                normalisers={"letters": choice_letter, "fill": number_normalise})

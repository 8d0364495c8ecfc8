"""ScienceQA (Lu et al., 2022), from the two layouts its users have on disk.

Official release:   <path>/problems.json, <path>/pid_splits.json,
                    <path>/images/{split}/{pid}/image.png
Hugging Face parquet (derek-thomas/ScienceQA): <path>/**/{train,validation,test}-*.parquet
                    with columns image, question, choices, answer, hint, subject, grade, ...

Prompts follow LLaVA's ScienceQA evaluation: context (the hint), question,
lettered options, "Answer with the option's letter from the given choices
directly."; the prediction is the option letter with the highest likelihood.
Questions without an image are valid: they have no visual tokens.
Categories: subject (NAT/SOC/LAN), context modality (TXT/IMG/NO; a question with
both text and image context counts in TXT and IMG, as in the paper) and grade
(G1-6 / G7-12).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from fednano.config import DataConfig, default_cache_dir
from fednano.data.answers import choice_letter
from fednano.data.checks import Collector, check_image, read_json, require
from fednano.data.samples import LETTERS, DataError, Sample, Task

SYSTEM = "You are a helpful assistant. Answer science questions with the letter of the correct option."
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
PARQUET_SPLITS = {"val": "validation", "validation": "validation", "train": "train", "test": "test"}


def format_question(question: str, choices: list[str], hint: str) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{question}\n{options}\n{INSTRUCTION}"


def _grade(grade: str) -> str:
    digits = "".join(ch for ch in str(grade) if ch.isdigit())
    return ("G1-6" if int(digits) <= 6 else "G7-12") if digits else ""


def make_sample(uid: str, rec: dict, image: str | None, where: str, check: Collector) -> Sample | None:
    problem = require(rec, ("question", "choices", "answer"), where)
    if problem:
        check.reject(uid, problem)
        return None
    choices, answer = list(rec["choices"]), rec["answer"]
    if not 2 <= len(choices) <= len(LETTERS):
        check.reject(uid, f"{where}: {len(choices)} choices (need 2 to {len(LETTERS)})")
        return None
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        check.reject(uid, f"{where}: answer index {answer!r} out of range for {len(choices)} choices")
        return None
    hint = str(rec.get("hint") or "").strip()
    context = "|".join(c for c, on in (("TXT", bool(hint)), ("IMG", image is not None)) if on) or "NO"
    meta = (("subject", SUBJECTS.get(str(rec.get("subject", "")), str(rec.get("subject", "")))), ("context", context),
            ("grade", _grade(rec.get("grade", ""))))
    return Sample(uid, format_question(str(rec["question"]), [str(c) for c in choices], hint), LETTERS[answer],
                  (image,) if image else (), candidates="letters", n_choices=len(choices), meta=meta)


def _official(root: Path, split: str, check: Collector) -> list[Sample]:
    problems = read_json(root / "problems.json")
    splits = read_json(root / "pid_splits.json")
    if split not in splits:
        raise DataError(f"{root / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})")
    out: list[Sample] = []
    for pid in splits[split]:
        uid, where = f"scienceqa/{split}/{pid}", f"{root / 'problems.json'} [{pid}]"
        rec = problems.get(str(pid))
        if rec is None:
            check.reject(uid, f"{root / 'pid_splits.json'}: pid {pid} not in problems.json")
            continue
        path = root / "images" / split / str(pid) / str(rec["image"]) if rec.get("image") else None
        _add(out, uid, rec, path, where, check)
    return out


def _add(out: list[Sample], uid: str, rec: dict, image: Path | None, where: str, check: Collector, prefix: str = "") -> bool:
    """Validate the sample's image (if any) and the record; append the sample if both are fine."""
    if image is not None:
        problem = check_image(image)
        if problem:
            check.reject(uid, prefix + problem)
            return False
    sample = make_sample(uid, rec, str(image) if image is not None else None, where, check)
    if sample:
        out.append(sample)
    return sample is not None


def _parquet(root: Path, split: str, check: Collector) -> list[Sample]:
    import pyarrow.parquet as pq

    name = PARQUET_SPLITS.get(split, split)
    files = sorted(p for p in root.rglob("*.parquet") if p.name.startswith(f"{name}-") or p.stem == name)
    if not files:
        raise DataError(f"{root}: no parquet file for split {split!r} (looked for {name}-*.parquet)")
    cache = Path(os.path.expanduser(default_cache_dir())) / "images" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] / name
    cache.mkdir(parents=True, exist_ok=True)
    out: list[Sample] = []
    for f in files:
        table = pq.read_table(f)
        missing = {"question", "choices", "answer"} - set(table.column_names)
        if missing:
            raise DataError(f"{f}: missing column(s) {sorted(missing)}")
        for row, rec in enumerate(table.to_pylist()):
            uid, where = f"scienceqa/{split}/{f.stem}#{row}", f"{f} [row {row}]"
            path = None
            img = rec.get("image")
            if img:
                data = img.get("bytes") if isinstance(img, dict) else img
                if not data:
                    check.reject(uid, f"{where}: image without bytes")
                    continue
                path = cache / f"{f.stem}-{row}.png"
                if not path.exists():
                    _save_png(data, path)
            if not _add(out, uid, rec, path, where, check, prefix=f"{where}: ") and path is not None and check_image(path):
                path.unlink(missing_ok=True)  # do not keep undecodable bytes in the cache
    return out


def _save_png(data: bytes, path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(path)
    except (UnidentifiedImageError, OSError):
        path.write_bytes(data)  # keep the bytes; check_image reports them as unreadable


def load_scienceqa(path: str, split: str, check: Collector) -> list[Sample]:
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        raise DataError(f"ScienceQA directory not found: {root}")
    return _official(root, split, check) if (root / "problems.json").exists() else _parquet(root, split, check)


def scienceqa_task(d: DataConfig, *_: int) -> Task:  # (caption images, prepare seed): easy-vqa's only
    check = Collector(d.skip_invalid)
    train, test = load_scienceqa(d.path, d.train_split, check), load_scienceqa(d.path, d.test_split, check)
    if not train or not test:
        raise DataError(f"{d.path}: no valid ScienceQA samples in split {d.train_split if not train else d.test_split!r}")
    return Task("scienceqa", train, test, {"letters": list(LETTERS)}, SYSTEM, ("subject", "context", "grade"), check.skipped,
                normalisers={"letters": choice_letter})

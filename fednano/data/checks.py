"""Validation shared by the dataset loaders: every problem names the file and the sample.

With `skip_invalid`, a Collector records (sample id -> reason) and the loader
drops the sample; without it, the first problem raises DataError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fednano.data.samples import DataError


class Collector:
    def __init__(self, skip_invalid: bool) -> None:
        self.skip_invalid = skip_invalid
        self.skipped: dict[str, str] = {}

    def reject(self, uid: str, reason: str) -> None:
        if not self.skip_invalid:
            raise DataError(f"{reason} (sample {uid}; set data.skip_invalid = true to skip such samples)")
        self.skipped[uid] = reason


def read_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def check_image(path: Path) -> str | None:
    """None if the image opens, else why not."""
    if not path.exists():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"unreadable image {path}: {e}"
    return None


def require(record: dict, fields: tuple[str, ...], where: str) -> str | None:
    missing = [f for f in fields if f not in record or record[f] is None]
    return f"{where}: missing field(s) {missing}" if missing else None

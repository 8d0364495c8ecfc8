"""Progress bars (tqdm) that stay quiet when stderr is not a terminal unless asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class _Bar:
    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def update(self, n: int = 1, **postfix: float) -> None:
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)


@contextmanager
def progress_bar(total: int, desc: str, position: int | None = None) -> Iterator[_Bar]:
    disable = os.environ.get("FEDNANO_PROGRESS", "auto") == "off" or (
        os.environ.get("FEDNANO_PROGRESS", "auto") == "auto" and not sys.stderr.isatty()
    )
    with tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, position=position) as bar:
        yield _Bar(bar)

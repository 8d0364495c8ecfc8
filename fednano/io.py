"""Atomic writes, done once: text and tensors go through a temporary file and os.replace, so a crash
mid-write leaves the previous file (results.json is the commit point of a round)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace: a crash mid-write leaves the previous file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file, written atomically (tensors from any device)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)

"""Shared fixtures: a tiny random backbone prepared once per session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FEDNANO_PROGRESS", "off")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


# Every device this machine has: the CPU always, CUDA when present (marker `gpu`, so
# `pytest -m gpu` runs exactly the GPU cases; CI has no GPU and skips them).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def run_tiny(tiny_cache: Path, out: Path, *sets: str, timeout: float = 300):
    """`fednano run` on the tiny config into `out` with `--set` overrides, as a user would; returns the finished process."""
    import subprocess
    import sys

    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    args = ["--config", str(TINY), "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    return subprocess.run([sys.executable, "-m", "fednano", "run", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fednano-cache")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_cache: Path):
    from fednano.config import load_config

    return load_config(TINY, {"model.cache_dir": str(tiny_cache)})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_cfg) -> Path:
    # The tiny connector is pre-trained on easy-vqa captions: where the package is missing (the GPU machine,
    # benchmarks/gpu_checks.py) the cases built on this bundle skip and say why, instead of erroring.
    pytest.importorskip("easy_vqa", reason="the tiny bundle is prepared on easy-vqa's images (package easy-vqa not installed)")
    from fednano.backbones.prepare import ensure_prepared

    return ensure_prepared(tiny_cfg)


@pytest.fixture()
def tiny_llm(tiny_bundle: Path):
    from fednano.backbones.bundle import load_server_llm

    return load_server_llm(tiny_bundle, torch.float32)


@pytest.fixture()
def tiny_edge(tiny_bundle: Path, tiny_cfg):
    from fednano.backbones.bundle import load_nanoedge

    return load_nanoedge(tiny_bundle / "client", tiny_cfg.adapter)


@pytest.fixture()
def tiny_llm_on(tiny_bundle: Path, device: torch.device):
    """The tiny server LLM on each available device."""
    from fednano.backbones.bundle import load_server_llm

    return load_server_llm(tiny_bundle, torch.float32, device)


@pytest.fixture()
def tiny_edge_on(tiny_bundle: Path, tiny_cfg, device: torch.device):
    """The tiny client bundle with its NanoEdge on each available device."""
    from fednano.backbones.bundle import load_nanoedge

    return load_nanoedge(tiny_bundle / "client", tiny_cfg.adapter, device)


def randomize_adapters(edge, seed: int = 0, scale: float = 0.05) -> None:
    """Give B non-zero values so gradients reach A as well (B = 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in edge.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)

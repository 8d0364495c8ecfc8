"""What the benchmarks share: timing on any device, this device's matmul rate, FLOP counting,
and LLMs with random weights at the shapes the paper uses (throughput only, never accuracy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fednano.data.prompts import IGNORE_INDEX
from fednano.devices import describe
from fednano.server.llm import ServerLLM

# name -> (visual tokens per image, how to build the LLM's config)
SHAPES = {
    "smol": 9,  # EfficientNet-Lite0 pooled to 3x3 -> SmolLM2-135M
    "llava-1.5-7b": 576,  # CLIP ViT-L/14-336 -> Vicuna-7B
    "minigpt4": 32,  # Q-Former queries -> Vicuna-7B
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def timeit(fn: Callable[[], object], repeats: int, device: torch.device = CPU) -> float:
    """Median seconds of `repeats` calls after one warm-up, the device synchronised around each."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """This device's dense matmul rate: 2048^3 on a CPU, 8192^3 on a GPU (the reference peak)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timeit(lambda: a @ b, repeats, device) / 1e9


class FlopCount(TorchDispatchMode):
    """Counts FLOPs of every op torch's FLOP formulas know (matmuls, attention, convs).

    FlopCounterMode itself cannot be used: its module tracker breaks
    autograd.grad on a leaf tensor (torch 2.13), which is exactly our step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCount() as fc:
        fn()
    return fc.flops


def random_llm(shape: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> ServerLLM:
    """The frozen LLM of a named MLLM with random weights, built on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    from fednano.backbones.bundle import random_causal_lm, random_mllm_config
    from fednano.backbones.footprint import smollm2_config

    if shape == "smol":
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(smollm2_config(), dtype=dtype)
    else:
        backbone = "llava" if shape.startswith("llava") else "blip2"
        cfg, _ = random_mllm_config(shape, backbone)
        model = random_causal_lm(cfg.to_dict(), backbone, dtype, device, seed)
    return ServerLLM(model, dtype)


def random_request(llm: ServerLLM, batch: int, tokens: int, answer_tokens: int = 4, seed: int = 0,
                   wire: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """A training step as the server receives it from the wire (CPU tensors): embeddings, a full
    mask, and labels on the last `answer_tokens` positions of each sample."""
    g = torch.Generator().manual_seed(seed)
    embeds = (torch.randn(batch, tokens, llm.hidden_size, generator=g) * 0.02).to(wire)
    labels = torch.full((batch, tokens), IGNORE_INDEX)
    labels[:, -answer_tokens:] = torch.randint(0, llm.vocab_size, (batch, answer_tokens), generator=g)
    return embeds, torch.ones(batch, tokens, dtype=torch.long), labels, "mean"


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")) -> list[str]:
    """Which of the matmul-relevant instruction sets this CPU reports (lscpu's flags, from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def machine(device: torch.device) -> str:
    d = describe(device)
    extra = f", {d['memory_gib']} GiB" if "memory_gib" in d else f", {d['threads']} torch threads, flags {' '.join(cpu_flags())}"
    return f"{d['device']} ({d['name']}{extra}), torch {torch.__version__}"

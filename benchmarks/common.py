"""What the benchmarks share: timing on any device, this device's matmul rate, FLOP counting,
LLMs with random weights at the shapes the paper uses (throughput only, never accuracy), the cost
of one server step, and a small LLaVA-format dataset drawn on the spot (for machines without easy-vqa)."""

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

# name -> visual tokens per image
SHAPES = {
    "smol": 9,  # EfficientNet-Lite0 pooled to 3x3 -> SmolLM2-135M
    "llava-1.5-7b": 576,  # CLIP ViT-L/14-336 -> Vicuna-7B
    "minigpt4": 32,  # Q-Former queries -> Vicuna-7B
    "tiny-llava": 4,  # TINY_LLAVA: a 28 px image in 14 px patches -> a 2-layer Llama
}

# LLaVA-1.5-7B's configuration (fednano/backbones/footprints/llava-1.5-7b.json) at toy width and depth: the same
# classes and code paths (CLIP tower, GELU projector, Llama), so that a rehearsal on a CPU runs what the GPU will.
# Its vocabulary covers the word-level tokenizer a random-weight bundle gets (bundle.random_mllm_config).
TINY_LLAVA = {
    "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 127, "pad_token_id": 126,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 4,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": False},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "projection_dim": 32},
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

    from fednano.backbones.bundle import SHIPPED_CONFIGS, random_causal_lm
    from fednano.backbones.footprint import load_config_file, smollm2_config

    if shape == "smol":
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(smollm2_config(), dtype=dtype)
    elif shape == "tiny-llava":
        model = random_causal_lm(TINY_LLAVA, "llava", dtype, device, seed)
    else:  # the shipped configuration alone (random_mllm_config would also build a tokenizer, from easy-vqa's words)
        backbone, filename = SHIPPED_CONFIGS[shape]
        model = random_causal_lm(load_config_file(filename), backbone, dtype, device, seed)
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


def server_step_cost(llm: ServerLLM, batch: int, visual: int, text: int, answer_tokens: int, repeats: int, device: torch.device,
                     matmul_gflops_bf16: float, flops: int | None = None) -> dict:
    """One split-learning server step (ServerLLM.train_steps, as the split server runs it: CPU tensors from the wire in,
    loss and d loss / d embeddings out) on batch x (visual + text) tokens: median seconds, FLOPs counted on the real
    step, the achieved rate as a fraction of the matmul rate given (measured in the same run), samples/s, the peak
    activation memory above the weights (CUDA only) and the bytes of the frames that would cross the wire. `flops`: counted
    beforehand, for an LLM under torch.compile (the counter sees eager ops only; compiling keeps the maths)."""
    from fednano.split.frames import Frame, encode

    req = random_request(llm, batch, visual + text, answer_tokens)
    step = lambda: llm.train_steps([req])[0]  # noqa: E731 - results left on the device, as the server encodes them later
    flops = count_flops(step) if flops is None else flops
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sec = timeit(step, repeats, device)
    rate = flops / sec / 1e9
    up = len(encode(Frame("train", {"embeds": req[0], "mask": req[1].to(torch.uint8), "labels": req[2].to(torch.int32)})))
    down = len(encode(Frame("train", {"loss": torch.zeros(()), "grad": req[0]}, {"n_tokens": 0})))
    return {"batch": batch, "tokens": visual + text, "visual_tokens": visual, "text_tokens": text, "seconds": sec, "tflop": flops / 1e12,
            "achieved_tflops": rate / 1000, "fraction_of_matmul": rate / matmul_gflops_bf16, "samples_per_s": batch / sec,
            "activation_gib": (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None,
            "bytes_up": up, "bytes_down": down}


def draw_llava_json(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A small VQA set in LLaVA's conversation JSON (fednano/data/llava_json.py reads it): PNGs of a coloured square on a
    random background, asked for its colour. For timing and memory where no dataset package is installed (the GPU
    machine has no easy-vqa); the images are real files through the real loader. Returns data.path (`<stem>_train.json`
    and `<stem>_test.json` lie beside it)."""
    import json
    import random

    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40), "purple": (140, 50, 170)}
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for i in range(n):
            name = rng.choice(sorted(colours))
            image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
            x, y, size = rng.randrange(0, 32), rng.randrange(0, 32), rng.randrange(16, 32)
            ImageDraw.Draw(image).rectangle((x, y, x + size, y + size), fill=colours[name])
            image.save(folder / "images" / f"{split}-{i}.png")
            records.append({"id": f"{split}-{i}", "image": f"images/{split}-{i}.png",
                            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                                              {"from": "gpt", "value": name}]})
        (folder / f"shapes_{split}.json").write_text(json.dumps(records))
    return folder / "shapes.json"


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

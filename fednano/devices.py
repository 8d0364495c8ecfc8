"""Where each side computes, and in what precision: device and dtype names, memory probes.

    "auto"    the first CUDA device this process can see, else the CPU
    "cpu"     the CPU
    "cuda"    the current CUDA device (cuda:0 unless CUDA_VISIBLE_DEVICES says otherwise)
    "cuda:N"  CUDA device N

A simulated client reserves `federation.client_gpus` of a GPU through Ray, which
hides every GPU (CUDA_VISIBLE_DEVICES="") from an actor that reserves none, so
"auto" on a client means: the GPU Ray gave it, if any. The wire format is the
only place tensors go to the CPU (`split.frames.encode`).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from fednano.config import DEVICE_PATTERN, ConfigError
from fednano.proc import peak_host_memory as peak_host_memory  # (torch-free: fednano/proc.py)
from fednano.proc import process_age as process_age

# Every dtype FedNano names (configs, the wire format): one map, both ways.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


def resolve_device(spec: str, field: str = "device") -> torch.device:
    """A config device name -> torch.device; a CUDA device that is not there is a ConfigError naming `field`."""
    if not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"{field}: {spec!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}: {spec!r} asked for, but this process sees no CUDA GPU (torch {torch.__version__}; "
                          "is this the CUDA build of torch? see docs/guides/gpus.md)")
    index = int(spec.partition(":")[2]) if ":" in spec else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{field}: {spec!r} asked for, but this process sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's first parameter lives (for a sharded LLM: where its input goes)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def describe(device: torch.device) -> dict[str, Any]:
    """What results.json records about a device: its name, and for CUDA the card."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": str(device), "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return {"device": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset (None on the CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpus_visible() -> int:
    """CUDA devices this process can use (0 without a CUDA build or a GPU)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_hidden() -> bool:
    """Whether this process was told to see no GPU (as Ray does for an actor that reserves none)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) == ""

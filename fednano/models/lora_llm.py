"""The comparison family's client: the whole MLLM on the client, LoRA inside the LLM.

FedIT trains a LoRA on the LLM's attention projections and the server averages it;
FedDPA-F adds a second, personal LoRA that never leaves the client. Both need the
client to hold every LLM weight - the cost FedNano removes. LoRA comes from PEFT
(`inject_adapter_in_model`: the same module surgery as `get_peft_model`, without
the wrapper), added to a `ServerLLM` in place; its parameters are float32 (the
frozen base stays in the compute dtype).

`LoRAEndpoint` gives such a model the split endpoint's `train_step` / `score`, so
the same training loop (`training.train_local`) drives it, in process.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fednano.config import AdapterConfig
from fednano.models.adapters import copy_state
from fednano.models.server_llm import ServerLLM

GLOBAL, LOCAL = "global", "local"


def add_lora(llm: ServerLLM, cfg: AdapterConfig, names: tuple[str, ...] = (GLOBAL,), seed: int = 0) -> None:
    """Inject one LoRA per name into the LLM's `cfg.lora_targets` (A random, B = 0: identity at start)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, _ in llm.model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"adapter.lora_targets: no layer named {missing} in the LLM (it has e.g. {sorted(present)[:12]})")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    for i, name in enumerate(names):
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two LoRAs is the point (FedDPA-F)
            torch.manual_seed(seed * 7919 + i)
            inject_adapter_in_model(config, llm.model, adapter_name=name)
    for n, p in llm.model.named_parameters():
        if ".lora_" in n:
            p.data = p.data.float()
    set_active(llm, names)


def set_active(llm: ServerLLM, names: tuple[str, ...]) -> None:
    """Which LoRAs take part in the forward pass (their outputs add up)."""
    from peft.tuners.lora import LoraLayer

    for m in llm.model.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(list(names))  # set_adapter also marks exactly these as trainable


def lora_parameters(llm: ServerLLM, name: str = GLOBAL) -> dict[str, nn.Parameter]:
    """The parameters of one LoRA, by name (the tensors that cross the wire for `global`)."""
    return {n: p for n, p in llm.model.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n}


def lora_state(llm: ServerLLM, name: str = GLOBAL) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_parameters(llm, name).items()}


def load_lora_state(llm: ServerLLM, state: dict[str, torch.Tensor], name: str = GLOBAL) -> None:
    copy_state(lora_parameters(llm, name), state, f"LoRA '{name}'")


def load_personal(llm: ServerLLM, path: Path, initial: dict[str, torch.Tensor]) -> bool:
    """Put one client's personal (`local`) LoRA in place: its own file, or `initial` - the
    LoRA as `add_lora` made it - when it has none yet. Never what the process last held:
    a simulation actor serves several clients in turn. Returns whether the file existed."""
    exists = path.exists()
    load_lora_state(llm, load_file(path) if exists else initial, LOCAL)
    return exists


def save_personal(llm: ServerLLM, path: Path) -> None:
    """Write the personal LoRA atomically (a crash mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu().contiguous() for k, v in lora_state(llm, LOCAL).items()}, tmp)
    os.replace(tmp, path)


def train_only(llm: ServerLLM, name: str) -> dict[str, nn.Parameter]:
    """Make exactly LoRA `name` trainable (the base and any other LoRA stay frozen)."""
    for p in llm.model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(llm, name)
    for p in params.values():
        p.requires_grad_(True)
    return params


class LoRAEndpoint:
    """An in-process LLM endpoint whose training step back-propagates into its LoRA
    parameters (not into the client's embeddings: the NanoAdapters are not used)."""

    def __init__(self, llm: ServerLLM) -> None:
        self.llm = llm

    def train_step(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, int]:
        losses, x, counts = self.llm.losses([(embeds, mask, labels, reduction)])
        losses.sum().backward()
        return losses[0].detach(), x.grad.to(embeds.device, embeds.dtype), int(counts[0])

    def score(self, *args, **kwargs) -> torch.Tensor:
        return self.llm.score(*args, **kwargs)

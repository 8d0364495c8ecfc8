"""The comparison family's client: the whole MLLM on the client, LoRA inside the LLM.

FedIT trains a LoRA on the LLM's attention projections and the server averages it;
FedDPA-F adds a second, personal LoRA that never leaves the client. Both need the
client to hold every LLM weight - the cost FedNano removes. LoRA comes from PEFT
(`inject_adapter_in_model`: the same module surgery as `get_peft_model`, without
the wrapper), added to a `ServerLLM` in place; its parameters are float32 (the
frozen base stays in the compute dtype).

`LoRAEndpoint` gives such a model the split endpoint's `train_step` / `score`, so
the same training loop (`client.training.train_local`) drives it, in process.
`WholeLLMLoRA` is the registry's component: what this family trains, on each side.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from fednano.backbones.bundle import load_server_llm
from fednano.backbones.prepare import bundle_dir
from fednano.client.adapters import copy_state
from fednano.client.training import StepHook, train_local
from fednano.config import AdapterConfig, TrainConfig
from fednano.data.samples import Sample
from fednano.devices import dtype_of
from fednano.federation import keys
from fednano.io import atomic_save_tensors
from fednano.runtime.client import ClientJob, ClientRuntime
from fednano.runtime.server import ServerSide
from fednano.server.llm import ServerLLM
from fednano.split.endpoint import LLMEndpoint

GLOBAL, LOCAL = "global", "local"


def add_lora(llm: ServerLLM, cfg: AdapterConfig, names: tuple[str, ...] = (GLOBAL,), seed: int = 0) -> None:
    """Inject one LoRA per name into the LLM's `cfg.lora_targets` (A random, B = 0: identity at start)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for n, _ in llm.model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"adapter.lora_targets: no layer named {missing} in the LLM (it has e.g. {sorted(present)[:12]})")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # a float scale works; PEFT types it int
                        target_modules=targets, lora_dropout=0.0, bias="none")
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
    atomic_save_tensors(lora_state(llm, LOCAL), path)


def personal_lora_file(state_dir: Path, partition: int) -> Path:
    """Where a FedDPA-F client keeps its personal LoRA (the node's state-dir; in simulation the run's client-state/)."""
    return Path(state_dir) / f"partition-{partition}-local-lora.safetensors"


def merge_loras(model: nn.Module, cfg: AdapterConfig, states: dict[str, dict[str, torch.Tensor]], where: str) -> nn.Module:
    """`model` (the HF model the LoRA states were trained in, as loaded) with every LoRA in `states`
    (name -> its tensors, named as `lora_state` names them) merged into the base weights by PEFT's
    `merge_and_unload`: a plain model again, with no cost at inference. `where` names the source in errors."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    modules = sorted({k.split(".lora_")[0] for st in states.values() for k in st})
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # a float scale works; PEFT types it int
                        target_modules=modules, lora_dropout=0.0, bias="none")
    names = list(states)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        tuner = LoraModel(model, {names[0]: config}, names[0])
        for name in names[1:]:
            tuner.peft_config[name] = config
            tuner.inject_adapter(model, name)
    params = dict(model.named_parameters())
    for name, st in states.items():
        missing = [k for k in st if k not in params]
        if missing or len(st) != sum(f".lora_A.{name}." in k or f".lora_B.{name}." in k for k in params):
            raise ValueError(f"{where}: LoRA '{name}' does not fit the model (e.g. {missing[:2]}); was it trained on this backbone?")
        with torch.no_grad():
            for k, v in st.items():
                params[k].copy_(v.to(params[k].dtype))
    return tuner.merge_and_unload(adapter_names=names)


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

    def train_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", parts: object = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        losses, x, counts = self.llm.losses([(embeds, mask, labels, reduction)])
        losses.sum().backward()
        assert x.grad is not None
        return losses[0].detach(), x.grad.to(embeds.device, embeds.dtype), int(counts[0])

    def score(self, *args, **kwargs) -> torch.Tensor:
        return self.llm.score(*args, **kwargs)

    def generate(self, *args, **kwargs) -> list[list[int]]:
        return self.llm.generate(*args, **kwargs)


# ------------------------------------------------------------------ the registry's component
T = TypeVar("T")


@dataclass(frozen=True)
class WholeLLMLoRA:
    """FedIT / FedDPA-F: each client holds the whole MLLM and trains LoRA inside the LLM (`personal`:
    FedDPA-F's second LoRA, which never leaves the client); the server merges the global LoRA."""

    personal: bool = False
    kind = "full-mllm"
    in_llm = True  # LoRA inside the LLM's layers

    def shared(self, state: Mapping[str, T]) -> dict[str, T]:
        """What of a state a client uploads: all of the global LoRA."""
        return dict(state)

    def client(self, rt: ClientRuntime) -> WholeLLMClient:
        return WholeLLMClient(rt, self.personal)

    def server(self, side: ServerSide) -> WholeLLMServer:
        return WholeLLMServer(side, self.personal)


class WholeLLMClient:
    """This family's client: it loads every LLM weight (the one place FedNano does so on a client)."""

    def __init__(self, rt: ClientRuntime, personal: bool) -> None:
        cfg = rt.cfg
        self.rt, self.personal = rt, personal
        self.llm = load_server_llm(bundle_dir(cfg), dtype_of(cfg.model.llm_dtype), rt.device)
        self.llm.set_attention(cfg.model.attention)
        add_lora(self.llm, cfg.adapter, (GLOBAL, LOCAL) if personal else (GLOBAL,), seed=cfg.federation.seed)
        self.local_init = lora_state(self.llm, LOCAL) if personal else {}  # where a client's personal LoRA starts

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.llm, state, GLOBAL)

    def _personal_path(self, job: ClientJob) -> Path:
        if job.state_dir is None:
            raise ValueError("feddpa-f needs a client state folder: set node config state-dir")
        return personal_lora_file(job.state_dir, job.partition)

    def train(
        self, job: ClientJob, samples: list[Sample], cfg: TrainConfig, hooks: Sequence[StepHook]
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        """FedDPA-F (sequential): first the global LoRA (alone) trains and is sent back; then the
        personal LoRA trains on top of the new global one, which stays frozen."""
        rt, endpoint = self.rt, LoRAEndpoint(self.llm)
        set_active(self.llm, (GLOBAL,))
        loss = train_local(rt.edge, endpoint, samples, rt.work, cfg, job.generator, params=train_only(self.llm, GLOBAL), hooks=hooks)
        extra = {}
        if self.personal:
            path = self._personal_path(job)
            load_personal(self.llm, path, self.local_init)
            set_active(self.llm, (GLOBAL, LOCAL))
            extra[keys.LOCAL_TRAIN_LOSS] = train_local(
                rt.edge, endpoint, samples, rt.work, cfg, job.generator, params=train_only(self.llm, LOCAL)
            )
            save_personal(self.llm, path)
        return loss, lora_state(self.llm, GLOBAL), extra

    def endpoint(self, job: ClientJob) -> LLMEndpoint:
        """What the client answers with: the global LoRA, plus (FedDPA-F) its own personal one."""
        if self.personal:
            has_own = load_personal(self.llm, self._personal_path(job), self.local_init)
            set_active(self.llm, (GLOBAL, LOCAL) if has_own else (GLOBAL,))
        return LoRAEndpoint(self.llm)


class WholeLLMServer:
    """The server keeps the global LoRA in its own LLM, to evaluate it on the global test set."""

    def __init__(self, side: ServerSide, personal: bool) -> None:
        self.side, self.personal = side, personal
        add_lora(side.llm, side.cfg.adapter, (GLOBAL,), seed=side.cfg.federation.seed)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.side.llm, GLOBAL)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.side.on_llm_thread(lambda: load_lora_state(self.side.llm, state, GLOBAL))

    def endpoint(self) -> LLMEndpoint:
        return self.side.endpoint

    def client_parameters(self) -> int:
        """The whole LLM and its LoRA besides the NanoEdge (whose embedding table is the LLM's own);
        FedDPA-F holds a second (personal) LoRA."""
        side = self.side
        lora = sum(p.numel() for p in lora_parameters(side.llm, GLOBAL).values())
        llm = sum(p.numel() for p in side.llm.model.parameters())
        return side.edge_parameters() + llm - side.edge.embed_tokens.weight.numel() + (lora if self.personal else 0)

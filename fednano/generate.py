"""Free-form answers from a tuned run, or from the folder `fednano export` wrote.

The run's NanoEdge (its final NanoAdapters loaded) embeds the prompt and its images; the frozen LLM
decodes (`ServerLLM.generate`, in this process or behind a split channel), embedding every generated
token through NanoAdapter-T like any text token. So the answer is the tuned MLLM's: the same tokens as
transformers' `generate` on the run's `fednano export`, which a test checks. Greedy by default, or
sampled (temperature, top_p, seed); decoding stops at the end-of-turn token (or EOS) or after
`max_new_tokens`. Also: reading a file of questions (LLaVA-JSON or JSONL).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.registry import COMPOSED_LLM, by_server_kind
from fednano.client.features import ImageFeatures
from fednano.client.nanoedge import NanoEdge
from fednano.data import system_prompt
from fednano.data.checks import Collector, check_image
from fednano.data.llava_json import SYSTEM as DEFAULT_SYSTEM
from fednano.data.llava_json import load_llava_json
from fednano.data.prompts import prompt_batch, stop_tokens
from fednano.data.samples import IMAGE_MARK, DataError, Sample
from fednano.devices import dtype_of, resolve_device
from fednano.export import EXPORT_INFO, ExportError, read_run, run_bundle
from fednano.methods.whole_llm import add_lora, load_lora_state
from fednano.server.llm import ServerLLM
from fednano.split.endpoint import GREEDY, Decoding


@dataclass
class Tuned:
    """What answering needs: the tuned NanoEdge, the frozen LLM, the tokenizer and the task's system prompt."""

    edge: NanoEdge
    llm: ServerLLM
    tokenizer: Any
    system: str
    features: ImageFeatures


def load_tuned(path: Path, device: str = "auto", client: int | None = None, client_state: Path | None = None) -> Tuned:
    """The tuned model in `path`, on `device` (a config device name): a run's results folder (its global
    model, or `client`'s own: see export.read_run), or a folder `fednano export` wrote."""
    path, dev = Path(path), resolve_device(device, "--device")
    if (path / EXPORT_INFO).exists():
        if client is not None:
            raise ExportError(f"{path}: an exported folder holds one model already; --client applies to a run's folder")
        return _load_export(path, dev)
    run = read_run(path, client, client_state)
    cfg = run.cfg
    bundle = run_bundle(run)  # the bundle whose digest is the run's: never another connector
    side = load_nanoedge(bundle / "client", cfg.adapter, dev)
    if run.adapters is not None:
        side.edge.load_adapter_state(run.adapters)
    llm = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype), dev)
    if run.loras:  # whole-LLM methods: their LoRAs inside the LLM, all active
        add_lora(llm, cfg.adapter, tuple(run.loras), seed=cfg.federation.seed)
        for name, state in run.loras.items():
            load_lora_state(llm, state, name)
    side.edge.eval()
    return Tuned(side.edge, llm, side.tokenizer, system_prompt(cfg.data.dataset), ImageFeatures(side.edge.vision))


def _load_export(path: Path, dev: torch.device) -> Tuned:
    """An exported folder: the folded weights with identity NanoAdapters (their effect is in the weights)."""
    info = json.loads((path / EXPORT_INFO).read_text())
    dtype = dtype_of(info.get("llm_dtype", "bfloat16"))
    side, llm = by_server_kind(info.get("kind", COMPOSED_LLM)).load_export(path, dtype, dev)
    side.edge.eval()
    return Tuned(side.edge, llm, side.tokenizer, str(info.get("system", DEFAULT_SYSTEM)), ImageFeatures(side.edge.vision))


@torch.no_grad()
def generate_ids(
    t: Tuned, content: str, images: list[str], decoding: Decoding = GREEDY, on_token: Callable[[list[int]], None] | None = None,
    endpoint: Any = None,
) -> list[int]:
    """Token ids of the answer to `content` (a user message with one `<image>` mark per image).
    `endpoint`: where the LLM is (a SplitClient: one round trip per answer); default the run's own LLM."""
    tok = t.tokenizer
    batch = prompt_batch(tok, [content], t.edge.num_visual_tokens, t.system)
    x = t.edge.embed(batch.input_ids, t.features(images) if images else None)
    stop, text_adapter = stop_tokens(tok), t.edge.text_adapter()
    if endpoint is not None:
        return endpoint.generate(x, batch.attention_mask, text_adapter, stop, decoding)[0]
    return t.llm.generate(x, batch.attention_mask, text_adapter, stop, decoding, on_token)[0]


def answer(t: Tuned, content: str, images: list[str], decoding: Decoding = GREEDY, stream: Callable[[str], None] | None = None) -> str:
    """The decoded answer; `stream` gets each new piece of text as it is generated."""
    shown = [""]

    def on_token(ids: list[int]) -> None:
        text = t.tokenizer.decode(ids, skip_special_tokens=True)
        if stream is not None and text.startswith(shown[0]):
            stream(text[len(shown[0]):])
            shown[0] = text

    ids = generate_ids(t, content, images, decoding, on_token=on_token if stream else None)
    return t.tokenizer.decode(ids, skip_special_tokens=True).strip()


def read_requests(path: Path) -> Iterator[Sample]:
    """Questions to answer from `path`: LLaVA-JSON (`.json`; a reference answer when it has one) or
    JSONL (`.jsonl`: one {"prompt": ..., "image": ...} per line, the image optional and relative to the
    file's folder). Bad entries raise DataError naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if path.suffix == ".json":
        yield from load_llava_json(path, Collector(skip_invalid=False))
        return
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise DataError(f"{path}:{n}: each line needs a string 'prompt' (and optionally an 'image')")
        images: tuple[str, ...] = ()
        question = rec["prompt"]
        if rec.get("image"):
            img = path.parent / str(rec["image"])
            problem = check_image(img)
            if problem:
                raise DataError(f"{path}:{n}: {problem}")
            images = (str(img),)
            question = question if IMAGE_MARK in question else f"{IMAGE_MARK}\n{question}"
        yield Sample(str(rec.get("id", n)), question, str(rec.get("answer", "")), images)

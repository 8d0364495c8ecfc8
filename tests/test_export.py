"""`fednano export`: the tuned MLLM as a standard checkpoint, NanoAdapters folded into its weights.

The folds are checked against hand-computed values and against the adapters themselves; the
exported folders, loaded with plain transformers, must give the logits FedNano's split model
gives with the same trained (non-zero) adapters.
"""

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.tiny import build_tiny_blip2, build_tiny_llava
from fednano.cli import app
from fednano.client.adapters import NanoAdapter
from fednano.client.features import ImageFeatures
from fednano.config import load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_image, load_split
from fednano.data.prompts import IMAGE_PLACEHOLDER, prompt_batch
from fednano.export import ExportError, export_model, export_run, fold_image_adapter, fold_text_adapter
from tests.conftest import ROOT, TINY, randomize_adapters

BUILDERS = {"llava": build_tiny_llava, "blip2": build_tiny_blip2}


# ------------------------------------------------------------------ the folds
def test_folds_against_hand_computed_values():
    # d = 2, r = 1, s = 0.5: E A^T = 1 + 2 = 3; s * 3 * B^T = [4.5, 6]
    A, B = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    assert fold_text_adapter(torch.tensor([[1.0, 1.0]]), A, B, 0.5).tolist() == [[5.5, 7.0]]
    # M = I + B A with A = [1, 0], B = [0, 1]^T: [[1, 0], [1, 1]]; W = I, b = [1, 2] -> W' = M, b' = [1, 3]
    w, b = fold_image_adapter(torch.eye(2), torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [1.0]]), 1.0)
    assert w.tolist() == [[1.0, 0.0], [1.0, 1.0]] and b.tolist() == [1.0, 3.0]


def test_folds_equal_the_adapters_they_replace():
    g = torch.Generator().manual_seed(0)
    ad = NanoAdapter(16, 4, 8.0)
    with torch.no_grad():
        ad.B.weight.copy_(torch.randn(16, 4, generator=g))
    A, B = ad.A.weight.detach(), ad.B.weight.detach()
    E = torch.randn(50, 16, generator=g)
    torch.testing.assert_close(fold_text_adapter(E, A, B, ad.scale), ad(E).detach(), atol=1e-5, rtol=1e-5)
    W, b, x = torch.randn(16, 7, generator=g), torch.randn(16, generator=g), torch.randn(5, 7, generator=g)
    w2, b2 = fold_image_adapter(W, b, A, B, ad.scale)
    torch.testing.assert_close(x @ w2.T + b2, ad(x @ W.T + b).detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ exported folders = FedNano's split model
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-checkpoints")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _trained(cfg):
    """FedNano's split model with trained (non-zero) adapters, and its logits on 3 easy-vqa prompts."""
    bundle = ensure_prepared(cfg)
    edge = load_nanoedge(bundle / "client", cfg.adapter).edge
    randomize_adapters(edge, scale=0.3)
    samples = list(load_split("train")[:3])
    tok = load_nanoedge(bundle / "client", cfg.adapter).tokenizer
    batch = prompt_batch(tok, [s.content() for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
    llm = load_server_llm(bundle, torch.float32)
    with torch.no_grad():
        feats = ImageFeatures(edge.vision)([s.image_path for s in samples])
        h = llm.decoder(inputs_embeds=edge.embed(batch.input_ids, feats), attention_mask=batch.attention_mask).last_hidden_state
        logits = llm.head(h)
    return edge, samples, batch, logits


def _untuned_logits(cfg, batch, samples):
    bundle = ensure_prepared(cfg)
    edge = load_nanoedge(bundle / "client", cfg.adapter).edge
    llm = load_server_llm(bundle, torch.float32)
    with torch.no_grad():
        x = edge.embed(batch.input_ids, ImageFeatures(edge.vision)([s.image_path for s in samples]))
        return llm.head(llm.decoder(inputs_embeds=x, attention_mask=batch.attention_mask).last_hidden_state)


@pytest.mark.parametrize("backbone", ["llava", "blip2"])
def test_an_exported_hf_mllm_gives_fednanos_logits_with_plain_transformers(checkpoints, tiny_cache, tmp_path, backbone):
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": backbone,
                             "model.checkpoint": str(checkpoints[backbone])})
    edge, samples, batch, ref = _trained(cfg)
    out = export_model(cfg, edge.adapter_state(), tmp_path / "export")

    cls = LlavaForConditionalGeneration if backbone == "llava" else Blip2ForConditionalGeneration
    hf = cls.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out) is not None
    ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_PLACEHOLDER, hf.config.image_token_id)
    images = torch.stack([load_image(s.image_path) for s in samples])
    with torch.no_grad():
        got = hf(input_ids=ids, pixel_values=edge.vision.preprocess(images), attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)
    assert (ref[mask] - _untuned_logits(cfg, batch, samples)[mask]).abs().max() > 1e-2  # the adapters matter
    # the tiny Llama ties its head to the input embeddings: the export unties them, the head keeps E
    assert hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()


def test_an_exported_composed_model_gives_fednanos_logits(tiny_cfg, tiny_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    edge, samples, batch, ref = _trained(tiny_cfg)
    out = export_model(tiny_cfg, edge.adapter_state(), tmp_path / "export")
    lm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()  # plain transformers
    vision = load_nanoedge(out / "vision", tiny_cfg.adapter).edge  # adapters at their identity init
    ids = batch.input_ids
    with torch.no_grad():
        visual = vision.visual_tokens(ImageFeatures(vision.vision)([s.image_path for s in samples]))  # the folded connector
        text = lm.get_input_embeddings()(ids.clamp(min=0))  # the LLM's own (folded) table
        x = text.masked_scatter((ids == IMAGE_PLACEHOLDER).unsqueeze(-1), visual.reshape(-1, text.shape[-1]))
        got = lm(inputs_embeds=x, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(vision.embed_tokens.weight, lm.get_input_embeddings().weight)  # one folded table, both sides
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the command
def _fake_run(tmp_path, tiny_cfg, state):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(tiny_cfg.to_toml())
    save_file(state, run / "adapters.safetensors")
    return run


def test_fednano_export_writes_a_loadable_folder(tiny_cfg, tiny_edge, tmp_path):
    run = _fake_run(tmp_path, tiny_cfg, tiny_edge.edge.adapter_state())
    res = CliRunner().invoke(app, ["export", str(run), "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "llm" / "config.json").exists() and (tmp_path / "out" / "vision" / "connector.safetensors").exists()
    assert (tmp_path / "out" / "fednano_export.json").exists()


def test_export_refuses_what_it_cannot_export_in_one_line(tiny_cfg, tiny_edge, tmp_path):
    run = _fake_run(tmp_path, tiny_cfg, {"base_model.layers.0.lora_A.weight": torch.zeros(2, 2)})
    res = CliRunner().invoke(app, ["export", str(run), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not the NanoAdapters" in res.output and len(res.output.strip().splitlines()) == 1
    (run / "adapters.safetensors").unlink()
    res = CliRunner().invoke(app, ["export", str(run), "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "the run has not finished" in res.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(tiny_cfg, tiny_edge.edge.adapter_state(), busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not a FedNano results folder"):
        export_run(tmp_path / "nowhere", tmp_path / "out2")


def test_the_readme_loading_example_runs(checkpoints, tiny_cache, tmp_path):
    """README's "Using the tuned model" example, run on an exported tiny LLaVA."""
    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "llava", "model.checkpoint": str(checkpoints["llava"])})
    edge = load_nanoedge(ensure_prepared(cfg) / "client", cfg.adapter).edge
    out = export_model(cfg, edge.adapter_state(), tmp_path / "export")
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(# load an export.*?)```", readme, re.S)
    exec(code.replace("results/export", str(out)), {})


# ------------------------------------------------------------------ a client's own model, LoRA merged
def composed_export_logits(out, cfg, samples):
    """Logits of an exported composed folder on `samples`' prompts: plain transformers for llm/, the
    documented NanoEdge loader for vision/."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(out / "llm", dtype=torch.float32).eval()
    side = load_nanoedge(out / "vision", cfg.adapter)
    batch = prompt_batch(side.tokenizer, [s.content() for s in samples], side.edge.num_visual_tokens, SYSTEM_PROMPT)
    ids = batch.input_ids
    with torch.no_grad():
        visual = side.edge.visual_tokens(ImageFeatures(side.edge.vision)([s.image_path for s in samples]))
        text = lm.get_input_embeddings()(ids.clamp(min=0))
        x = text.masked_scatter((ids == IMAGE_PLACEHOLDER).unsqueeze(-1), visual.reshape(-1, text.shape[-1]))
        return lm(inputs_embeds=x, attention_mask=batch.attention_mask).logits, batch.attention_mask.bool()


def split_model_logits(cfg, adapters, loras, samples):
    """Logits of FedNano's own model: the NanoEdge with `adapters` (None: as initialised) and the server
    LLM with each LoRA in `loras` active (name -> its tensors)."""
    from fednano.methods.whole_llm import add_lora, load_lora_state

    bundle = ensure_prepared(cfg)
    side = load_nanoedge(bundle / "client", cfg.adapter)
    if adapters is not None:
        side.edge.load_adapter_state(adapters)
    llm = load_server_llm(bundle, torch.float32)
    if loras:
        add_lora(llm, cfg.adapter, tuple(loras), seed=cfg.federation.seed)
        for name, state in loras.items():
            load_lora_state(llm, state, name)
    batch = prompt_batch(side.tokenizer, [s.content() for s in samples], side.edge.num_visual_tokens, SYSTEM_PROMPT)
    with torch.no_grad():
        x = side.edge.embed(batch.input_ids, ImageFeatures(side.edge.vision)([s.image_path for s in samples]))
        return llm.head(llm.decoder(inputs_embeds=x, attention_mask=batch.attention_mask).last_hidden_state)


def _lora_run(tmp_path, tiny_cfg, method, scale=0.2):
    """A results folder of a LoRA method: trained (non-zero) global LoRA, and client 0's personal one."""
    from fednano.methods.whole_llm import GLOBAL, LOCAL, add_lora, lora_state

    cfg = dataclasses.replace(tiny_cfg, federation=dataclasses.replace(tiny_cfg.federation, strategy=method))
    llm = load_server_llm(ensure_prepared(cfg), torch.float32)
    add_lora(llm, cfg.adapter, (GLOBAL, LOCAL), seed=0)
    g = torch.Generator().manual_seed(3)
    states = {n: {k: torch.randn(v.shape, generator=g) * scale for k, v in lora_state(llm, n).items()} for n in (GLOBAL, LOCAL)}
    run = _fake_run(tmp_path, cfg, states[GLOBAL])
    (run / "client-state").mkdir()
    save_file(states[LOCAL], run / "client-state" / "partition-0-local-lora.safetensors")
    return cfg, run, states


@pytest.mark.parametrize("method, client", [("fedit-lora", None), ("feddpa-f", None), ("feddpa-f", 0)])
def test_an_exported_lora_model_gives_the_lora_models_logits(tiny_cfg, tiny_bundle, tmp_path, method, client):
    """fedit-lora / feddpa-f: the global LoRA (and with --client, that client's personal LoRA) merged into
    the LLM by PEFT's merge_and_unload; plain transformers then gives the LoRA model's logits."""
    from fednano.methods.whole_llm import GLOBAL

    cfg, run, states = _lora_run(tmp_path, tiny_cfg, method)
    out = export_run(run, tmp_path / "export", client=client)
    samples = list(load_split("train")[:3])
    got, mask = composed_export_logits(out, cfg, samples)
    ref = split_model_logits(cfg, None, states if client is not None else {GLOBAL: states[GLOBAL]}, samples)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)
    plain = split_model_logits(cfg, None, {}, samples)
    assert (ref[mask] - plain[mask]).abs().max() > 1e-2  # the LoRAs matter
    if client is not None:
        without_personal = split_model_logits(cfg, None, {GLOBAL: states[GLOBAL]}, samples)
        assert (ref[mask] - without_personal[mask]).abs().max() > 1e-2


def test_export_client_refusals_say_what_to_do(tiny_cfg, tiny_edge, tmp_path):
    _, run, _ = _lora_run(tmp_path / "a", tiny_cfg, "feddpa-f")
    with pytest.raises(ExportError, match="partition-1-local-lora.safetensors not found.*--client-state"):
        export_run(run, tmp_path / "out", client=1)
    _, run, _ = _lora_run(tmp_path / "b", tiny_cfg, "fedit-lora")
    res = CliRunner().invoke(app, ["export", str(run), "--output", str(tmp_path / "out"), "--client", "0"])
    assert res.exit_code == 2 and "keeps no per-client model" in res.output and len(res.output.strip().splitlines()) == 1
    (tmp_path / "c").mkdir()
    fednano = _fake_run(tmp_path / "c", tiny_cfg, tiny_edge.edge.adapter_state())
    with pytest.raises(ExportError, match="'fednano' merges every client"):
        export_run(fednano, tmp_path / "out", client=0)
    assert not (tmp_path / "out").exists()

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
from fednano.export_code import FILES
from fednano.export_code.modeling_fednano import FedNanoForConditionalGeneration
from fednano.export_code.processing_fednano import FedNanoProcessor
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
    """The folder's own model and processor (the code it carries, run here from fednano/export_code, byte for byte
    the same files) on FedNano's prompts and images: FedNano's split-model logits, and the same prompt ids."""
    edge, samples, batch, ref = _trained(tiny_cfg)
    out = export_model(tiny_cfg, edge.adapter_state(), tmp_path / "export")
    got, ids, mask = composed_export_logits(out, samples, SYSTEM_PROMPT)
    vision = load_nanoedge(out / "vision", tiny_cfg.adapter).edge  # the NanoEdge folder: the same folds
    model = FedNanoForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(vision.embed_tokens.weight, model.get_input_embeddings().weight)  # one folded table, both sides
    assert torch.equal(ids.masked_fill(ids == model.config.image_token_id, IMAGE_PLACEHOLDER)[mask], batch.input_ids[mask])
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)
    for name in FILES:
        assert (out / name).read_bytes() == (ROOT / "fednano" / "export_code" / name).read_bytes()


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
    assert (tmp_path / "out" / "modeling_fednano.py").exists() and (tmp_path / "out" / "vision" / "connector.safetensors").exists()
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


def test_the_export_guide_loading_example_runs(checkpoints, tiny_cache, tmp_path):
    """The export guide's loading example (docs/guides/export.md), run on an exported tiny LLaVA."""
    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "llava", "model.checkpoint": str(checkpoints["llava"])})
    edge = load_nanoedge(ensure_prepared(cfg) / "client", cfg.adapter).edge
    out = export_model(cfg, edge.adapter_state(), tmp_path / "export")
    guide = (ROOT / "docs" / "guides" / "export.md").read_text()
    (code,) = re.findall(r"```python\n(# load an export.*?)```", guide, re.S)
    exec(code.replace("results/export", str(out)), {})


# ------------------------------------------------------------------ a composed export answers with transformers alone
NO_FEDNANO = """import sys


class _NoFedNano:  # the venv has fednano installed (editable): this finder goes first and refuses it
    def find_spec(self, name, path=None, target=None):
        if name == "fednano" or name.startswith("fednano."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoFedNano())
"""


def run_without_fednano(tmp_path, *args):
    """`python ARGS` in a fresh interpreter where `import fednano` fails (a sitecustomize on PYTHONPATH blocks it),
    run from a folder outside the repository, transformers' remote-code module cache under tmp_path."""
    import os
    import subprocess
    import sys

    site = tmp_path / "no-fednano"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_FEDNANO)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=site, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tuned_export(tiny_cfg, tiny_bundle, tmp_path):
    """A tuned tiny run (adapters strong enough that the tiny random model's answers vary), its export, and FedNano's
    own model of that run (adapters not folded: what `fednano generate RUN` answers with)."""
    from fednano.generate import load_tuned

    edge = load_nanoedge(tiny_bundle / "client", tiny_cfg.adapter).edge
    randomize_adapters(edge, scale=3.0)
    run = _fake_run(tmp_path, tiny_cfg, edge.adapter_state())
    return load_tuned(run, "cpu"), export_run(run, tmp_path / "export")


def _until_stop(ids, tokenizer):
    from fednano.data.prompts import stop_tokens

    stop = set(stop_tokens(tokenizer))
    return ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def test_the_export_guide_image_example_answers_like_fednano_generate_without_fednano(tuned_export, tmp_path):
    """The guide's image example (AutoModelForImageTextToText + AutoProcessor, trust_remote_code), run where FedNano
    cannot be imported, gives the tokens `fednano generate` gives from the run for the same image question."""
    import json

    from fednano.generate import generate_ids
    from fednano.split.endpoint import Decoding

    tuned, out = tuned_export
    blocked = run_without_fednano(tmp_path, "-c", "import fednano")
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr  # the block works
    guide = (ROOT / "docs" / "guides" / "export.md").read_text()
    (code,) = re.findall(r"```python\n(# answer an image question.*?)```", guide, re.S)
    samples = list(load_split("test"))[:3]
    script = ["import json, sys", "answers = []"]
    for s in samples:
        script += [code.replace('"results/export"', json.dumps(str(out))).replace('"photo.png"', json.dumps(s.image_path))
                   .replace('"<image>\\nwhat is the red shape?"', json.dumps(s.content())), "answers.append(answer.tolist())"]
    script += ["assert not [m for m in sys.modules if m.split('.')[0] == 'fednano']", "print(json.dumps(answers))"]
    res = run_without_fednano(tmp_path, "-c", "\n".join(script))
    assert res.returncode == 0, res.stderr[-3000:]
    got = [_until_stop(ids, tuned.tokenizer) for ids in json.loads(res.stdout.strip().splitlines()[-1])]
    want = [generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=16)) for s in samples]
    assert got == want and len({t for a in want for t in a}) >= 3  # several different tokens: the adapters shaped them


def test_the_answer_from_export_example_runs_on_llava_json_without_fednano(tuned_export, tmp_path):
    """examples/answer_from_export.py on a LLaVA-JSON file (images beside it), where FedNano cannot be imported:
    FedNano's answers to the same questions from the run, and the exact-match count."""
    import json
    import shutil

    from fednano.generate import answer
    from fednano.split.endpoint import Decoding

    tuned, out = tuned_export
    data = tmp_path / "data"
    data.mkdir()
    samples = list(load_split("test"))[:3]
    records = []
    for i, s in enumerate(samples):
        shutil.copy(s.image_path, data / f"img{i}.png")
        records.append({"id": f"q{i}", "image": f"img{i}.png",
                        "conversations": [{"from": "human", "value": s.question}, {"from": "gpt", "value": s.answer}]})
    (data / "questions.json").write_text(json.dumps(records))
    res = run_without_fednano(tmp_path, ROOT / "examples" / "answer_from_export.py", out, data / "questions.json", "--max-new-tokens", "16")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    want = [answer(tuned, s.content(), [str(data / f"img{i}.png")], Decoding(max_new_tokens=16)) for i, s in enumerate(samples)]
    assert [line.split(" -> ", 1)[1].rsplit(" (truth: ", 1)[0].strip() for line in lines[:-1]] == want
    right = sum(w.lower().rstrip(".") == s.answer.lower() for w, s in zip(want, samples, strict=True))
    assert lines[-1] == f"{right}/3 exact matches"


def test_the_restated_efficientnet_lite0_gives_the_packages_features():
    """The export's EfficientNet-Lite0 (modeling_fednano, no package) loads the package's parameters by name and gives
    its feature maps, at its 224 design size and at another (its padding stays the one fixed for 224)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from fednano.export_code.modeling_fednano import EfficientNetLite0

    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():  # random BatchNorm statistics too, so every part of the state matters
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    ours = EfficientNetLite0().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("_fc.")})  # strict: every name matches
    for size in (224, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref.extract_features(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ a client's own model, LoRA merged
def _folder_processor(out):
    """The folder's processor built from its files with FedNano's copy of its code (AutoProcessor would import the
    folder's copy, into transformers' module cache)."""
    import json

    from transformers import AutoTokenizer

    from fednano.export_code.image_processing_fednano import FedNanoImageProcessor

    saved = json.loads((out / "processor_config.json").read_text())
    return FedNanoProcessor(FedNanoImageProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out),
                            **{k: saved[k] for k in ("image_token", "num_image_tokens", "system_prompt")})


def composed_export_logits(out, samples, system):
    """Logits of an exported composed folder's model on `samples`' prompts and images, made by the folder's processor,
    right-aligned as FedNano's batches are (the processor pads on the left) -> (logits, input ids, mask), each (B, T, ...)."""
    from PIL import Image

    model = FedNanoForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = _folder_processor(out)
    rows = []
    for s in samples:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": s.content()}]
        prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(images=[Image.open(p) for p in s.images], text=prompt)
        with torch.no_grad():
            rows.append((model(**inputs).logits[0], inputs["input_ids"][0]))
    T = max(ids.shape[0] for _, ids in rows)
    logits = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[0])) for x, _ in rows])
    ids = torch.stack([torch.nn.functional.pad(i, (0, T - i.shape[0])) for _, i in rows])
    mask = torch.stack([torch.arange(T) < i.shape[0] for _, i in rows])
    return logits, ids, mask


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
    got, _, mask = composed_export_logits(out, samples, SYSTEM_PROMPT)
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

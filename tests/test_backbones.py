"""LLaVA-1.5, BLIP-2 (MiniGPT-4 style) and composed backbones from local checkpoints.

Tiny random checkpoints are built from the real configuration classes and saved
with save_pretrained; FedNano loads them by path, splits them, and must compute
exactly what the unsplit HF model computes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fednano.backbones.bundle import BundleError, load_hf_mllm, load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.tiny import build_tiny_blip2, build_tiny_llava, build_tiny_llm
from fednano.client.features import ImageFeatures
from fednano.client.training import split_step
from fednano.config import load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_image, load_split
from fednano.data.prompts import IMAGE_PLACEHOLDER, training_batch
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer
from tests.conftest import ROOT, TINY, randomize_adapters

BUILDERS = {"llava": build_tiny_llava, "blip2": build_tiny_blip2}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _cfg(tiny_cache, backbone, checkpoint):
    return load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": backbone, "model.checkpoint": str(checkpoint)})


def _hook_adapters(hf_model, backbone, edge):
    """Splice the NanoAdapters into the unsplit HF model at the same two places."""
    visual_out = hf_model.model.multi_modal_projector if backbone == "llava" else hf_model.language_projection
    hooks = [
        visual_out.register_forward_hook(lambda m, i, o: edge.adapter_i(o)),
        hf_model.get_input_embeddings().register_forward_hook(lambda m, i, o: edge.adapter_t(o)),
    ]
    return hooks


@pytest.mark.parametrize("backbone", ["llava", "blip2"])
@pytest.mark.parametrize("randomized", [False, True], ids=["zero-init", "trained"])
def test_split_equals_unsplit_hf_model(checkpoints, tiny_cache, backbone, randomized):
    cfg = _cfg(tiny_cache, backbone, checkpoints[backbone])
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    edge, tok = client.edge, client.tokenizer
    if randomized:
        randomize_adapters(edge)
    samples = list(load_split("train")[:3])
    batch = training_batch(tok, [s.content() for s in samples], [s.answer for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
    images = torch.stack([load_image(s.image_path) for s in samples])

    hf, _ = load_hf_mllm(checkpoints[backbone], backbone)
    hf.eval()
    hooks = _hook_adapters(hf, backbone, edge)
    ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_PLACEHOLDER, hf.config.image_token_id)
    out = hf(input_ids=ids, pixel_values=edge.vision.preprocess(images), attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    ref = {k: p.grad.clone() for k, p in edge.adapter_parameters().items()}
    for h in hooks:
        h.remove()

    edge.zero_grad(set_to_none=True)
    llm = load_server_llm(bundle, torch.float32)
    with SplitServer(llm) as server, SplitClient(server.address, wire_dtype="float32") as split:
        loss = split_step(edge, split, batch, ImageFeatures(edge.vision)([s.image_path for s in samples]))
    assert loss == pytest.approx(out.loss.item(), abs=1e-5)
    for k, g in ref.items():
        torch.testing.assert_close(edge.adapter_parameters()[k].grad, g, atol=1e-5, rtol=1e-4)
    assert ref["adapter_i.B.weight"].abs().sum() > 0 and ref["adapter_t.B.weight"].abs().sum() > 0


def test_visual_token_counts_follow_the_checkpoint(checkpoints, tiny_cache):
    llava = load_nanoedge(ensure_prepared(_cfg(tiny_cache, "llava", checkpoints["llava"])) / "client", load_config(TINY).adapter)
    blip2 = load_nanoedge(ensure_prepared(_cfg(tiny_cache, "blip2", checkpoints["blip2"])) / "client", load_config(TINY).adapter)
    assert llava.edge.num_visual_tokens == (32 // 8) ** 2  # patches, CLS dropped ("default")
    assert blip2.edge.num_visual_tokens == 4  # the Q-Former's queries


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: [p.unlink() for p in d.glob("*.safetensors")], r"no weights \(\*.safetensors or \*.bin\)"),
        (lambda d: [p.unlink() for p in d.glob("tokenizer*")], "no tokenizer"),
        (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "llama"})),
         "model_type is 'llama', expected 'llava'"),
    ],
)
def test_broken_checkpoints_name_what_is_missing(checkpoints, tiny_cache, tmp_path, damage, needle):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llava"], broken)
    damage(broken)
    with pytest.raises(BundleError, match=needle) as err:
        ensure_prepared(_cfg(tiny_cache, "llava", broken))
    assert str(broken) in str(err.value)


def test_missing_checkpoint_directory(tiny_cache, tmp_path):
    with pytest.raises(BundleError, match="checkpoint directory not found"):
        ensure_prepared(_cfg(tiny_cache, "blip2", tmp_path / "nowhere"))


def _run_cli(args, tiny_cache, out_dir):
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    cmd = [sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out_dir), "--set", "federation.rounds=1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out_dir / "results.json").read_text())


@pytest.mark.parametrize("backbone", ["llava", "blip2"])
def test_federated_run_with_hf_backbone(checkpoints, tiny_cache, tmp_path, backbone):
    res = _run_cli(["--backbone", backbone, "--checkpoint", str(checkpoints[backbone])], tiny_cache, tmp_path / "run")
    (r,) = res["rounds"]
    assert r["clients_accepted"] == 2 and set(r["client_accuracy"]) == {"0", "1"}
    assert r["bytes"]["activations_up"] > 0 and res["final"]["global_accuracy"] >= 0.0
    assert res["config"]["model"]["backbone"] == backbone


def test_compose_any_causal_lm_with_efficientnet(tiny_cache, tmp_path):
    llm_dir = build_tiny_llm(tmp_path / "my-llm")
    res = _run_cli(["--backbone", "compose", "--set", f"model.llm_path={json.dumps(str(llm_dir))}"], tiny_cache, tmp_path / "run")
    assert res["rounds"][0]["clients_accepted"] == 2
    bundle_meta = json.loads(next(Path(tiny_cache).glob("compose-*/client/nanoedge.json")).read_text())
    assert bundle_meta["kind"] == "compose" and bundle_meta["vision"] == {"type": "efficientnet-lite0"}

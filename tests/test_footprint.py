"""Footprints from the real LLaVA-1.5-7B / MiniGPT-4 / smol configurations (meta device)."""

import pytest
from typer.testing import CliRunner

from fednano.backbones.footprint import footprint
from fednano.cli import app


def test_llava_15_7b_matches_the_papers_adapter_count():
    f = footprint("llava-1.5-7b", rank=64)
    assert f.adapter_params == 1_048_576  # the paper's figure: 2 x (4096*64 + 64*4096)
    assert 7.0e9 < f.total_params < 7.1e9  # LLaVA-1.5-7B
    assert f.client["vision_encoder"] == 303_507_456  # CLIP ViT-L/14-336
    assert f.client["embedding_table"] == 32064 * 4096
    assert 93.0 < f.storage_reduction_pct < 94.0
    assert f.visual_tokens == 576
    assert f.step_activation_bytes == 8 * (576 + 64) * 4096 * 2
    # server + client (without adapters) = the whole model, minus the input table the server does not need
    assert f.server_params + f.client_params - f.adapter_params == f.total_params


def test_minigpt4_and_smol():
    g = footprint("minigpt4", rank=64)
    assert g.visual_tokens == 32 and 0.98e9 < g.client["vision_encoder"] < 0.99e9  # EVA ViT-g/14
    s = footprint("smol", rank=16)
    assert s.adapter_params == 36_864 and s.client["embedding_table"] == 49152 * 576
    # tied embeddings: the server keeps the table as its LM head
    assert s.server_params + s.client_params - s.adapter_params - s.client["embedding_table"] == s.total_params


def test_footprint_cli_table_and_errors():
    res = CliRunner().invoke(app, ["footprint", "--backbone", "llava-1.5-7b", "--rank", "64"])
    assert res.exit_code == 0 and "1,048,576" in res.output and "93.53 %" in res.output
    res = CliRunner().invoke(app, ["footprint", "--backbone", "gpt-5"])
    assert res.exit_code == 2 and "unknown footprint backbone" in res.output


@pytest.mark.real
def test_smol_footprint_matches_the_real_model():
    import os
    from pathlib import Path

    from fednano.backbones.bundle import convert_smollm2, load_llm
    from fednano.config import default_cache_dir

    model, _ = load_llm(convert_smollm2(Path(os.path.expanduser(default_cache_dir())) / "smollm2-135m-instruct"))
    f = footprint("smol", rank=16)
    assert f.server_params == sum(p.numel() for p in model.parameters())


def test_protocol_bytes_at_llava_scale_against_hand_computed_values():
    """Per step at LLaVA-1.5-7B shapes (8 x (576 + 64) tokens, d = 4096, r = 64, bf16 wire): activations send
    the embeddings (8*640*4096*2) plus mask and labels (8*640*(1+4)); cached-features+ids send ids, mask and labels
    (8*640*(4+1+4)) and both adapters in float32 (2 * 2*64*4096*4)."""
    f = footprint("llava-1.5-7b", rank=64)
    d = f.as_dict()["protocols"]
    assert (d["activations"]["step_up"], d["activations"]["step_down"]) == (41_968_640, 41_943_044)
    assert (d["cached-features+ids"]["step_up"], d["cached-features+ids"]["step_down"]) == (4_240_384, 4_194_308)
    text_rows, adapter = 8 * 64 * 4096 * 2, 2 * 64 * 4096 * 4
    assert d["cached-features"]["step_up"] == 8 * 640 * 6 + text_rows + adapter
    assert d["cached-features"]["image_bytes"] == 576 * 4096 * 2
    rnd = d["activations"]["round"]  # 25 steps + a Fisher pass of 32 samples (4 steps), adapters and Fisher in fp32
    assert rnd["split_up"] == 29 * 41_968_640 and rnd["adapters_up"] == rnd["fisher_up"] == 4 * 1_048_576
    assert d["cached-features"]["round"]["features_up"] == 29 * 8 * 576 * 4096 * 2
    assert d["cached-features"]["round_images_sent"]["features_up"] == 0
    assert f.lora_params == 32 * 2 * 8 * (4096 + 4096)  # FedIT: rank 8 on q_proj and v_proj of 32 layers

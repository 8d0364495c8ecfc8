"""`fednano leakage`: the server-side attacks against hand-built cases, and on a tiny run's frames."""

import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fednano.backbones.bundle import load_nanoedge
from fednano.backbones.prepare import ensure_prepared
from fednano.cli import app
from fednano.leakage import as_received, image_top1, nearest_rows, text_recovered
from tests.conftest import randomize_adapters, run_tiny


def test_nearest_rows_and_text_recovery_by_hand():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.2, 0.9]])
    assert nearest_rows(x, table, chunk=2).tolist() == [1, 0, 2]
    ids = torch.tensor([[1, 0, -200, 2]])  # one image slot (-200) is not text
    # position 0 -> row 1 (true 1: recovered); position 1 [0.1, 0.8] -> row 2 (true 0: missed); the last is padding
    received = torch.tensor([[[0.9, 0.1], [0.1, 0.8], [5.0, 5.0], [0.0, 0.6]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert text_recovered(received, ids, mask, table) == (1, 2)


def test_image_retrieval_by_hand():
    pool = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[3.0, 3.0]]])  # 3 candidates, 1 token each
    received = torch.tensor([[[0.9, 1.2]], [[0.2, 0.1]]])
    assert image_top1(received, pool, [1, 0]) == 2 and image_top1(received, pool, [2, 0]) == 1


def test_what_the_server_decodes_is_the_wire_dtype():
    x = torch.randn(2, 3, 4)
    assert torch.equal(as_received(x, "float32"), x)
    assert torch.equal(as_received(x, "bfloat16"), x.to(torch.bfloat16).float())
    assert (as_received(x, "int8") - x).abs().max() <= x.abs().max() / 127


def _audited_run(cfg, tmp_path, protocol: str) -> dict:
    """`fednano leakage` on a run folder whose final adapters are strong (random, scale 3) under `protocol`."""
    import dataclasses

    cfg = dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, protocol=protocol))
    edge = load_nanoedge(ensure_prepared(cfg) / "client", cfg.adapter).edge
    randomize_adapters(edge, scale=3.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    save_file(edge.adapter_state(), run / "adapters.safetensors")
    res = CliRunner().invoke(app, ["leakage", str(run), "--per-client", "4", "--pool", "20"])
    assert res.exit_code == 0, res.output
    assert "text tokens recovered" in (run / "leakage.md").read_text()
    return json.loads((run / "leakage.json").read_text())


def test_at_init_the_server_reads_every_text_token_and_image_and_the_adapters_change_that(tiny_cfg, tiny_bundle, tmp_path):
    """Under the activations protocol (the embeddings themselves cross)."""
    out = _audited_run(tiny_cfg, tmp_path, "activations")
    init, final = out["round 0 (adapters at init)"], out["final (round 2)"]
    assert init["text_tokens"] > 0 and init["text_tokens_recovered"] == 1.0  # NanoAdapter-T is the identity at init
    assert init["image_top1"] == 1.0 and init["images"] == 8 and init["image_pool"] == 20
    assert init["answer_tokens_in_clear"] == 1.0 and init["answer_tokens"] > 0
    assert final["text_tokens_recovered"] < 1.0  # strong adapters move the embeddings off the table's rows


def test_the_cached_protocols_hand_the_server_the_ids_and_the_connector_outputs(tiny_cfg, tiny_bundle, tmp_path):
    """The same strong adapters that hide text rows under `activations` hide nothing under
    `cached-features+ids`: the ids are the text, and each image's connector output (before NanoAdapter-I) is sent."""
    final = _audited_run(tiny_cfg, tmp_path, "cached-features+ids")["final (round 2)"]
    assert final["text_tokens_recovered"] == 1.0 and final["image_top1"] == 1.0


def test_the_per_round_audit_records_what_the_server_reads_every_round(tiny_bundle, tiny_cache, tmp_path):
    """privacy.audit in a real simulation: round 0 (identity adapters, fp32 wire, the paper's split) leaks every text
    token, answer token and image; every round after has its own entry, and leakage.png is drawn."""
    out = tmp_path / "run"
    sets = ["privacy.audit=true", "privacy.audit_samples=4", "privacy.audit_pool=20", 'split.protocol="activations"', "federation.rounds=2"]
    proc = run_tiny(tiny_cache, out, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    zero = res["zero_shot_leakage"]
    assert (zero["text_tokens_recovered"], zero["answer_tokens_in_clear"], zero["image_top1"]) == (1.0, 1.0, 1.0)
    assert zero["images"] == 8 and zero["image_pool"] == 20 and zero["text_tokens"] > 0  # 4 samples of each of 2 clients
    for r in res["rounds"]:
        leak = r["leakage"]
        assert 0 <= leak["text_tokens_recovered"] <= 1 and leak["answer_tokens_in_clear"] == 1.0
        assert leak["text_tokens"] == zero["text_tokens"]  # the same samples every round
        assert r["phase_seconds"]["audit"] >= 0
    assert (out / "leakage.png").stat().st_size > 0

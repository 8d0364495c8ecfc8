"""A real Flower simulation (ServerApp + ClientApps in Ray actors) through the CLI."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY


def _processes_of(marker: str, settle: float = 0.0) -> list[int]:
    """PIDs whose environment holds FEDNANO_TEST_RUN=<marker>: the run and every process it
    started (Ray's gcs_server, raylet and actors inherit the environment), whatever else
    runs on the machine. Ray's processes take a few seconds to exit after shutdown."""
    needle = f"FEDNANO_TEST_RUN={marker}".encode()
    deadline = time.time() + settle
    while True:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.5)


def test_tiny_run_two_clients_two_rounds(tiny_bundle, tiny_cache, tmp_path):
    out_dir = tmp_path / "run"
    marker = uuid.uuid4().hex
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off", "FEDNANO_TEST_RUN": marker}
    # scored both ways: the closed set, and the model's own generated answers (data.scoring = "generate")
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out_dir),
                           "--set", 'data.scoring="generate"', "--set", "data.answer_tokens=4"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("config.toml", "results.json", "adapters.safetensors", "accuracy.png", "table.md", "run.log"):
        assert (out_dir / name).stat().st_size > 0, name
    res = json.loads((out_dir / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for r in res["rounds"]:
        assert set(r["client_accuracy"]) == {"0", "1"}
        assert 0.0 <= r["global_accuracy"] <= 1.0 and r["train_loss"] > 0
        assert r["clients_accepted"] == 2 and r["aggregated"]
        b = r["bytes"]
        assert b["adapters_up"] == b["fisher_up"] > 0
        assert r["bytes_per_client"] == sum(b.values()) // 2
        assert b["adapters_down"] == 2 * b["adapters_up"]  # train + evaluate messages
        assert b["activations_up"] > 0 and b["gradients_down"] > 0 and b["eval_activations_up"] > 0
        # each client generated its local test answers through the split channel: one round trip each
        assert b["eval_generate_up"] > 0 and b["eval_answers_down"] > 0
        assert 0.0 <= r["global_generated_accuracy"] <= 1.0 and set(r["client_generated_accuracy"]) == {"0", "1"}
    assert set(res["final"]) >= {"global_accuracy", "zero_shot_accuracy", "generated_accuracy", "zero_shot_generated_accuracy"}
    assert "global acc. (generated)" in (out_dir / "table.md").read_text()
    # where each side computed, and what it held (no GPU in a simulated client without client_gpus)
    devices = res["final"]["devices"]
    assert devices["server"]["device"] in ("cpu", "cuda:0") and devices["server"]["dtype"] == "float32"
    assert {d["device"] for d in devices["clients"].values()} == {"cpu"} and set(devices["clients"]) == {"0", "1"}
    assert res["final"]["random_weights"] is False
    for r in res["rounds"]:
        assert r["memory"]["server_peak_rss_bytes"] > 2**20
        assert set(r["memory"]["client_peak_rss_bytes"]) == {"0", "1"}
    assert res["config"]["federation"]["strategy"] == "fednano"
    # what each client reported holding, in numbers (sizes and the answers' histogram)
    assert set(res["node_data"]) == {"0", "1"} and all(d["train"] == sum(d["labels"].values()) > 0 for d in res["node_data"].values())
    assert _processes_of(marker, settle=20) == []  # nothing left running: no SuperLink, no Ray

    # the default split protocol (cached-features+ids) against the paper's (activations): the same adapters, fewer bytes
    assert res["config"]["split"]["protocol"] == "cached-features+ids"
    paper = tmp_path / "activations"
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(paper),
                           "--set", 'split.protocol="activations"'], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, theirs = load_file(out_dir / "adapters.safetensors"), load_file(paper / "adapters.safetensors")
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4)
    cheap, full = res["rounds"][0]["bytes"], json.loads((paper / "results.json").read_text())["rounds"][0]["bytes"]
    assert cheap["features_up"] > 0 and full["features_up"] == 0
    assert cheap["activations_up"] + cheap["features_up"] < full["activations_up"]


def test_a_run_with_a_validation_set_scores_the_test_sets_at_the_end_only(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out),
                           "--set", "federation.rounds=3", "--set", "federation.eval_every=2", "--set", "data.validation_samples=16"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    r1, r2, r3 = res["rounds"]
    assert r1["global_accuracy"] is None and "validation_accuracy" not in r1 and r1["client_accuracy"] == {}
    assert r1["bytes"]["eval_activations_up"] == 0  # no client evaluated
    assert r2["global_accuracy"] is None and 0 <= r2["validation_accuracy"] <= 1 and r2["client_accuracy"] == {}
    assert 0 <= r3["global_accuracy"] <= 1 and 0 <= r3["validation_accuracy"] <= 1 and set(r3["client_accuracy"]) == {"0", "1"}
    assert 0 <= res["zero_shot_validation_accuracy"] <= 1
    best = res["final"]["best_validation"]
    scored = {r["round"]: r["validation_accuracy"] for r in (r2, r3)}
    top = max(scored.values())
    assert best["validation_accuracy"] == top and best["round"] == min(k for k, v in scored.items() if v == top)  # the first best
    assert 0 <= best["global_accuracy"] <= 1 and set(best["client_accuracy"]) == {"0", "1"}
    assert (out / res["best_validation"]["adapters"]).exists() and res["best_validation"]["round"] == best["round"]  # kept to score
    assert res["final"]["global_accuracy"] == r3["global_accuracy"]
    assert "Best validation round" in (out / "table.md").read_text()

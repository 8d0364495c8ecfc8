"""FedNano-EF and FedProx on the client: the maths against direct computation, and runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fednano.config import load_config
from fednano.data.easyvqa import load_split
from fednano.training import ImageFeatures, Workload, batches, split_step, train_local
from tests.conftest import ROOT, TINY


def _work(bundle):
    return Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens)


def test_ef_fisher_is_the_mean_squared_training_gradient(tiny_edge, tiny_llm):
    cfg = load_config(TINY).train
    cfg.local_steps, cfg.lr = 1, 1e-9  # one step: the Fisher is that step's squared gradient
    edge, work = tiny_edge.edge, _work(tiny_edge)
    samples = list(load_split("train")[:40])
    start = edge.adapter_state()
    stats = train_local(edge, tiny_llm, samples, work, cfg, torch.Generator().manual_seed(3), accumulate_fisher=True)
    edge.load_adapter_state(start)
    edge.zero_grad(set_to_none=True)
    batch = next(batches(samples, cfg.batch_size, torch.Generator().manual_seed(3)))
    split_step(edge, tiny_llm, *work.train_batch(batch))
    for k, p in edge.adapter_parameters().items():
        torch.testing.assert_close(stats["fisher"][k], p.grad**2, atol=1e-12, rtol=1e-4)


def test_proximal_term_pulls_towards_the_global_adapters(tiny_edge, tiny_llm):
    cfg = load_config(TINY).train
    cfg.local_steps, cfg.lr = 5, 0.05
    edge, work = tiny_edge.edge, _work(tiny_edge)
    samples = list(load_split("train")[:40])
    start = edge.adapter_state()
    dist = {}
    for mu in (0.0, 100.0):
        edge.load_adapter_state(start)
        train_local(edge, tiny_llm, samples, work, cfg, torch.Generator().manual_seed(0), proximal_mu=mu, anchor=start)
        dist[mu] = sum(float((p - start[k]).norm() ** 2) for k, p in edge.adapter_state().items()) ** 0.5
    assert dist[100.0] < dist[0.0]


@pytest.mark.parametrize("method", ["fednano-ef", "fedprox"])
def test_methods_run_end_to_end(tiny_bundle, tiny_cache, tmp_path, method):
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out),
                           "--set", "federation.rounds=1", "--set", f"federation.strategy='{method}'"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = json.loads((out / "results.json").read_text())["rounds"]
    assert r["clients_accepted"] == 2
    assert (r["bytes"]["fisher_up"] > 0) == (method == "fednano-ef")

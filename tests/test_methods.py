"""The methods on the client: FedNano-EF, FedProx, the exact Fisher and LoRA against direct
computation; and every registered method run end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fednano.client.evaluation import candidate_scores
from fednano.client.features import ImageFeatures, Workload
from fednano.client.fisher import FisherFromTraining, candidate_distribution, empirical_fisher, exact_fisher_batches
from fednano.client.training import Proximal, batches, split_step, train_local
from fednano.config import load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.methods.registry import METHODS
from tests.conftest import ROOT, TINY, randomize_adapters

TINY_STEPS = load_config(TINY).train.local_steps


def _work(bundle):
    return Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens, SYSTEM_PROMPT)


def test_ef_fisher_is_the_mean_squared_training_gradient(tiny_edge, tiny_llm):
    cfg = load_config(TINY).train
    cfg.local_steps, cfg.lr = 1, 1e-9  # one step: the Fisher is that step's squared gradient
    edge, work = tiny_edge.edge, _work(tiny_edge)
    samples = list(load_split("train")[:40])
    start = edge.adapter_state()
    ef = FisherFromTraining()
    train_local(edge, tiny_llm, samples, work, cfg, torch.Generator().manual_seed(3), hooks=[ef])
    edge.load_adapter_state(start)
    edge.zero_grad(set_to_none=True)
    batch = next(batches(samples, cfg.batch_size, torch.Generator().manual_seed(3)))
    split_step(edge, tiny_llm, *work.train_batch(batch))
    for k, p in edge.adapter_parameters().items():
        torch.testing.assert_close(ef.fisher()[k], p.grad**2, atol=1e-12, rtol=1e-4)


def test_proximal_term_pulls_towards_the_global_adapters(tiny_edge, tiny_llm):
    cfg = load_config(TINY).train
    cfg.local_steps, cfg.lr = 5, 0.05
    edge, work = tiny_edge.edge, _work(tiny_edge)
    samples = list(load_split("train")[:40])
    start = edge.adapter_state()
    dist = {}
    for mu in (0.0, 100.0):
        edge.load_adapter_state(start)
        train_local(edge, tiny_llm, samples, work, cfg, torch.Generator().manual_seed(0), hooks=[Proximal(start, mu)] if mu else [])
        dist[mu] = sum(float((p - start[k]).norm() ** 2) for k, p in edge.adapter_state().items()) ** 0.5
    assert dist[100.0] < dist[0.0]


def test_candidate_distribution_hand_computed():
    lp = torch.log(torch.tensor([1.0, 3.0, 4.0]))
    torch.testing.assert_close(candidate_distribution(lp), torch.tensor([0.125, 0.375, 0.5], dtype=torch.float64))
    torch.testing.assert_close(candidate_distribution(lp, n_valid=2), torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))


def test_exact_fisher_is_the_expectation_over_the_models_answers(tiny_edge, tiny_llm):
    """F = sum_c p(c|x) g_c^2, with g_c the gradient of log p(c|x), checked candidate by candidate."""
    edge, work = tiny_edge.edge, _work(tiny_edge)
    randomize_adapters(edge, seed=5)
    sample = load_split("train")[7]
    cands = ["red", "blue", "circle", "yes"]
    fisher, n = empirical_fisher(edge, tiny_llm, exact_fisher_batches(edge, tiny_llm, [sample], work, {"answers": cands}, 4))
    assert n == pytest.approx(1.0)
    ((_, lp, _),) = candidate_scores(edge, tiny_llm, [sample], work, {"answers": cands}, 4)
    probs = candidate_distribution(lp)
    want = {k: torch.zeros_like(v) for k, v in fisher.items()}
    for c, p in zip(cands, probs, strict=True):
        edge.zero_grad(set_to_none=True)
        split_step(edge, tiny_llm, *work.train_batch([dataclasses.replace(sample, answer=c)]))  # mean over tokens
        n_tok = int((work.train_batch([dataclasses.replace(sample, answer=c)])[0].labels != -100).sum())
        for k, q in edge.adapter_parameters().items():
            want[k] += float(p) * (q.grad * n_tok) ** 2  # the summed (per-sample) log-likelihood's gradient
    for k in want:
        torch.testing.assert_close(fisher[k], want[k], rtol=1e-3, atol=1e-10)
    empirical, _ = empirical_fisher(edge, tiny_llm, [work.train_batch([sample])])
    assert any(not torch.allclose(empirical[k], fisher[k]) for k in fisher)


def test_lora_is_the_identity_at_init_and_trains_only_the_chosen_adapter(tiny_bundle, tiny_cfg):
    from fednano.backbones.bundle import load_server_llm
    from fednano.methods.whole_llm import (
        GLOBAL,
        LOCAL,
        LoRAEndpoint,
        add_lora,
        load_lora_state,
        lora_parameters,
        lora_state,
        set_active,
        train_only,
    )

    llm = load_server_llm(tiny_bundle, torch.float32)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 7, llm.hidden_size, generator=g)
    mask, labels = torch.ones(2, 7, dtype=torch.long), torch.tensor([[-100] * 5 + [3, 4]] * 2)
    before = LoRAEndpoint(llm).train_step(e, mask, labels)[0]
    add_lora(llm, tiny_cfg.adapter, (GLOBAL, LOCAL), seed=0)
    assert float(LoRAEndpoint(llm).train_step(e, mask, labels)[0]) == pytest.approx(float(before), abs=1e-6)  # B = 0
    n_layers = llm.model.config.num_hidden_layers
    assert len(lora_parameters(llm, GLOBAL)) == 2 * 2 * n_layers  # A and B, on q_proj and v_proj of every layer
    with pytest.raises(ValueError, match="state keys"):
        load_lora_state(llm, {"x": torch.zeros(1)}, GLOBAL)
    set_active(llm, (GLOBAL, LOCAL))
    params = train_only(llm, LOCAL)
    llm.model.zero_grad(set_to_none=True)
    LoRAEndpoint(llm).train_step(e, mask, labels)
    assert all(p.grad is not None for k, p in params.items() if ".lora_B." in k)
    assert all(p.grad is None for p in lora_parameters(llm, GLOBAL).values())
    # both LoRAs act when both are active, only the global one otherwise
    for name in (GLOBAL, LOCAL):
        load_lora_state(llm, {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora_state(llm, name).items()}, name)
    both = float(LoRAEndpoint(llm).train_step(e, mask, labels)[0])
    set_active(llm, (GLOBAL,))
    only_global = float(LoRAEndpoint(llm).train_step(e, mask, labels)[0])
    assert both != pytest.approx(only_global, abs=1e-4)


def _run(tiny_cache, out, *sets, timeout=400):
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    args = [a for kv in sets for a in ("--set", kv)]
    proc = subprocess.run(
        [sys.executable, "-m", "fednano", "run", "--config", str(TINY), "--output", str(out), "--set", "federation.rounds=1", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(tiny_bundle, tiny_cache, tmp_path, method):
    """2 clients x 1 round through `fednano run` with the tiny backbone, for every registered method."""
    m = METHODS[method].describe()
    res = _run(tiny_cache, tmp_path / "run", f"federation.strategy='{method}'")
    (r,) = res["rounds"]
    final = res["final"]
    assert r["clients_sampled"] == (1 if m["topology"] == "centralized" else 2)
    assert r["clients_accepted"] == r["clients_sampled"]
    assert set(r["client_accuracy"]) == {"0", "1"}  # every client evaluates on its own test split
    sends_fisher = m["fisher"] != "none"
    assert (r["bytes"]["fisher_up"] > 0) == sends_fisher
    shared = final["adapter_parameters"] // (2 if m["client"] == "nanoedge-ffa" else 1)  # FFA uploads B only
    assert final["uploaded_parameters_per_round"] == shared * (2 if sends_fisher else 1)
    assert r["bytes"]["adapters_up"] == 4 * shared * r["clients_accepted"]  # float32
    if m["client"] == "nanoedge-ffa":  # A never leaves the shared seeded initialisation; B trained
        _check_ffa_kept_a(tmp_path / "run", res["config"])
    if m["client"] == "full-mllm":  # no split channel: the client computes everything with its own LLM
        assert r["bytes"]["activations_up"] == 0 and r["split_steps"] == 0
        assert final["client_parameters"] > 3 * final["adapter_parameters"]
        assert (tmp_path / "run" / "client-state" / "partition-0-local-lora.safetensors").exists() == m["personal"]
    else:
        assert r["bytes"]["activations_up"] > 0
        per_client = TINY_STEPS * (2 if m["topology"] == "centralized" else 1) + (1 if m["fisher"] == "pass" else 0)
        assert r["split_steps"] == per_client * r["clients_sampled"]
    if m["topology"] == "local":  # each client's own adapters on the global test; the global accuracy is their mean
        cga = r["client_global_accuracy"]
        assert set(cga) == {"0", "1"} and r["global_accuracy"] == pytest.approx(sum(cga.values()) / 2)
        _check_client_export(tmp_path / "run", tiny_cache, tmp_path)
    assert len(r["client_seconds"]) == r["clients_sampled"]
    phases = r["client_phase_seconds"]  # where each client's message time went
    assert set(phases["train"]) == set(r["client_seconds"]) and set(phases["evaluate"]) == {"0", "1"}
    for p in [*phases["train"].values(), *phases["evaluate"].values()]:
        assert {"build", "data", "work"} <= set(p) <= {"start", "build", "data", "work"} and min(p.values()) >= 0
    if m["topology"] == "centralized":  # the one trainer holds every client's training data
        parts = json.loads((tmp_path / "run" / "partition.json").read_text())["clients"]
        assert r["train_examples"] == sum(c["train"] for c in parts)


def _check_ffa_kept_a(run, config):
    from safetensors.torch import load_file

    from fednano.client.adapters import NanoAdapter

    final = load_file(run / "adapters.safetensors")
    gen = torch.Generator().manual_seed(config["federation"]["seed"])  # as the server's initial_state draws them
    for name in ("adapter_i", "adapter_t"):
        rank, dim = final[f"{name}.A.weight"].shape
        start = NanoAdapter(dim, rank, config["adapter"]["alpha"])
        start.reset_parameters(gen)
        assert torch.equal(final[f"{name}.A.weight"], start.A.weight.detach()) and final[f"{name}.B.weight"].abs().sum() > 0


def _check_client_export(run, tiny_cache, tmp_path):
    """`local` keeps no global model: `fednano export --client 1` writes client 1's own model (its adapters from
    the run's last checkpoint), which gives that client's logits; without --client the command says which ids exist."""
    from safetensors.torch import load_file

    from fednano.data.easyvqa import SYSTEM_PROMPT
    from tests.test_export import composed_export_logits, split_model_logits

    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off"}
    cmd = [sys.executable, "-m", "fednano", "export", str(run), "--output", str(tmp_path / "export")]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert refused.returncode == 2 and "pass --client ID (one of [0, 1])" in refused.stderr + refused.stdout
    done = subprocess.run([*cmd, "--client", "1"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = load_config(run / "config.toml", {"model.cache_dir": str(tiny_cache)})
    strategy = load_file(run / json.loads((run / "results.json").read_text())["checkpoint"]["strategy"])
    own = {k[len("client.1."):]: v for k, v in strategy.items() if k.startswith("client.1.")}
    samples = list(load_split("train")[:2])
    got, _, mask = composed_export_logits(tmp_path / "export", samples, SYSTEM_PROMPT)
    torch.testing.assert_close(got[mask], split_model_logits(cfg, own, {}, samples)[mask], atol=1e-5, rtol=1e-4)


def test_exact_fisher_runs_end_to_end(tiny_bundle, tiny_cache, tmp_path):
    res = _run(tiny_cache, tmp_path / "run", "federation.fisher_type='exact'")
    (r,) = res["rounds"]
    assert r["clients_accepted"] == 2 and r["bytes"]["fisher_up"] > 0
    assert r["split_steps"] > 2 * (TINY_STEPS + 1)  # one step per sample of the Fisher subset


def test_a_clients_personal_lora_starts_from_its_own_file_or_the_initial_lora(tiny_bundle, tiny_cfg, tmp_path):
    """FedDPA-F: a simulation actor serves several clients in turn, so a client that has no
    personal LoRA yet must start from the initial one, not from the last client's."""
    from fednano.backbones.bundle import load_server_llm
    from fednano.methods.whole_llm import GLOBAL, LOCAL, add_lora, load_lora_state, load_personal, lora_state, save_personal

    llm = load_server_llm(tiny_bundle, torch.float32)
    add_lora(llm, tiny_cfg.adapter, (GLOBAL, LOCAL), seed=0)
    initial = lora_state(llm, LOCAL)
    g = torch.Generator().manual_seed(1)
    trained = {k: torch.randn(v.shape, generator=g) for k, v in initial.items()}  # client 0's personal LoRA
    load_lora_state(llm, trained, LOCAL)
    save_personal(llm, tmp_path / "partition-0.safetensors")
    assert not load_personal(llm, tmp_path / "partition-1.safetensors", initial)  # client 1, first time
    assert all(torch.equal(v, initial[k]) for k, v in lora_state(llm, LOCAL).items())
    assert any(v.abs().sum() == 0 for k, v in initial.items() if ".lora_B." in k)  # B = 0 at init
    assert load_personal(llm, tmp_path / "partition-0.safetensors", initial)  # client 0 again
    assert all(torch.equal(v, trained[k]) for k, v in lora_state(llm, LOCAL).items())
    assert not list(tmp_path.glob("*.tmp"))

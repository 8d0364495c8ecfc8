"""Metric local DP on the text embeddings a client sends (privacy.embedding_noise): the noise's law, its ε, where
it lands in a NanoEdge's embeddings, and what it hides from the server in a real run."""

import json

import pytest
import torch

from fednano.client.features import ImageFeatures
from fednano.config import ConfigError, load_config
from fednano.data.easyvqa import load_split
from fednano.data.prompts import IMAGE_PLACEHOLDER
from fednano.privacy import TextNoise, client_dp_epsilon, embedding_privacy, metric_dp_noise, metric_epsilon, typical_distance
from tests.conftest import TINY, run_tiny


def test_the_noise_has_the_multivariate_laplace_law(device):
    """Norm ~ Gamma(d, 1/ε): mean d/ε and variance d/ε²; direction uniform: mean vector ≈ 0; seeded."""
    n, d, eps = 40_000, 16, 2.0
    z = metric_dp_noise(n, d, eps, torch.Generator(device=device).manual_seed(0))
    assert z.shape == (n, d) and z.device.type == device.type
    norm = z.norm(dim=1)
    assert float(norm.mean()) == pytest.approx(d / eps, rel=0.01)
    assert float(norm.var()) == pytest.approx(d / eps**2, rel=0.04)
    assert float(z.mean(0).abs().max()) < 0.05
    again = metric_dp_noise(n, d, eps, torch.Generator(device=device).manual_seed(0))
    assert torch.equal(z, again)


def test_epsilon_from_the_noise_level_by_hand():
    table = torch.tensor([[3.0, 4.0], [0.0, 5.0], [6.0, 8.0]])  # row norms 5, 5, 10: median 5
    assert metric_epsilon(2.0, table) == pytest.approx(2 / (2.0 * 5))  # d / E‖z‖, E‖z‖ = 2 × 5
    two = torch.tensor([[3.0, 4.0], [6.0, 8.0]])  # norms 5 and 10: torch's (lower) median is 5
    assert typical_distance(two) == pytest.approx(5.0)  # the only pair of distinct rows
    got = embedding_privacy(0.5, two)
    assert got["epsilon_per_unit_distance"] == pytest.approx(2 / (0.5 * 5))  # 0.8
    assert got["epsilon_typical_token_pair"] == pytest.approx(5.0 * 0.8) and got["expected_noise_norm"] == pytest.approx(2.5)


def test_the_noise_lands_on_the_text_positions_only_and_repeats_per_seed(tiny_edge_on, device):
    edge = tiny_edge_on.edge
    sample = load_split("train")[0]
    ids = torch.tensor([[5] + [IMAGE_PLACEHOLDER] * edge.num_visual_tokens + [7, 8, 9]])
    feats = ImageFeatures(edge.vision)([sample.image_path])
    with torch.no_grad():
        clean = edge.embed(ids, feats)
        edge.text_noise = TextNoise(epsilon=metric_epsilon(1.0, edge.embed_tokens.weight), seed=3)
        try:
            noisy = edge.embed(ids, feats)
            edge.text_noise.reseed(3)
            again = edge.embed(ids, feats)
            unnoised = edge.embed(ids, feats, noised=False)
        finally:
            edge.text_noise = None
    is_image = (ids == IMAGE_PLACEHOLDER).to(device)
    torch.testing.assert_close(noisy[is_image], clean[is_image])  # the visual tokens are untouched
    assert bool(((noisy - clean)[~is_image].norm(dim=-1) > 0).all())  # every text position moved
    assert torch.equal(noisy, again) and torch.equal(unnoised, clean)


def test_noise_needs_the_activations_protocol():
    with pytest.raises(ConfigError, match="privacy.embedding_noise: noise on the text embeddings needs split.protocol = 'activations'"):
        load_config(TINY, {"privacy.embedding_noise": 0.5})  # the default protocol sends token ids
    with pytest.raises(ConfigError, match="privacy.embedding_noise: must be >= 0"):
        load_config(TINY, {"privacy.embedding_noise": -1.0, "split.protocol": "activations"})


def test_a_noised_run_reports_its_epsilon_and_the_server_recovers_fewer_tokens(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    sets = ["privacy.audit=true", "privacy.audit_samples=4", "privacy.audit_pool=20", 'split.protocol="activations"',
            "privacy.embedding_noise=5.0", "federation.rounds=1"]
    proc = run_tiny(tiny_cache, out, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["privacy"]["embedding_noise"] == 5.0 and res["privacy"]["epsilon_per_unit_distance"] > 0
    # without noise the identity adapters hand the server every text token (test_leakage); with it, far fewer
    assert res["zero_shot_leakage"]["text_tokens_recovered"] < 0.4
    assert res["zero_shot_leakage"]["image_top1"] == 1.0  # the noise is on the text only
    assert 0 <= res["final"]["global_accuracy"] <= 1


def test_the_dp_accountant_is_opacus_rdp_and_inverts_to_its_noise():
    from opacus.accountants.utils import get_noise_multiplier

    eps = client_dp_epsilon(1.1, 0.1, 20, 1e-5)
    assert 0 < eps < client_dp_epsilon(1.1, 0.1, 40, 1e-5) and client_dp_epsilon(2.2, 0.1, 20, 1e-5) < eps  # more rounds spend more
    # Opacus's own search for the noise that gives this epsilon over the same rounds finds the noise we used
    assert get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=0.1, steps=20, accountant="rdp") == pytest.approx(
        1.1, abs=0.02)
    assert client_dp_epsilon(0.0, 0.1, 5, 1e-5) == float("inf")


def test_client_dp_is_refused_where_there_is_no_single_merge():
    from fednano.methods.registry import METHODS

    for name in ("fednano-product", "local", "centralized"):
        with pytest.raises(ConfigError, match=f"privacy.client_dp: '{name}' is neither a FedAvg-family nor a Fisher-merging"):
            METHODS[name].check(load_config(TINY, {"privacy.client_dp": True, "federation.strategy": name}))
    for name in ("fedprox", "fednano", "fednano-ffa"):
        METHODS[name].check(load_config(TINY, {"privacy.client_dp": True, "federation.strategy": name}))
    with pytest.raises(ConfigError, match="privacy.fisher_groups"):
        load_config(TINY, {"privacy.fisher_groups": "entry"})


def test_fisher_merging_under_client_dp_accounts_for_its_two_noised_sums():
    from fednano.methods.combiners import ClientDP, ClientDPFisher
    from fednano.methods.registry import METHODS, client_dp_noise
    from fednano.privacy import noise_for_epsilon

    cfg = load_config(TINY, {"privacy.client_dp": True, "federation.strategy": "fednano", "privacy.noise_multiplier": 1.5,
                             "privacy.fisher_groups": "rank"})
    assert client_dp_noise(cfg) == (1.5, pytest.approx(1.5 / 2**0.5))
    combiner = METHODS["fednano"].combiner(cfg)
    assert isinstance(combiner, ClientDPFisher) and combiner.by_rank and combiner.noise_multiplier == 1.5
    avg = load_config(TINY, {"privacy.client_dp": True, "federation.strategy": "fedavg", "privacy.target_epsilon": 4.0})
    seen = noise_for_epsilon(4.0, 1e-5, 1.0, avg.federation.rounds)
    assert client_dp_noise(avg) == (pytest.approx(seen), pytest.approx(seen)) and isinstance(METHODS["fedavg"].combiner(avg), ClientDP)
    fis = load_config(TINY, {"privacy.client_dp": True, "federation.strategy": "fednano", "privacy.target_epsilon": 4.0})
    assert client_dp_noise(fis) == (pytest.approx(seen * 2**0.5), pytest.approx(seen))


def test_a_client_dp_run_reports_the_epsilon_it_spent_each_round(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    sets = ['federation.strategy="fedavg"', "privacy.client_dp=true", "privacy.noise_multiplier=1.5", "privacy.clip_norm=0.5",
            "federation.rounds=2", "privacy.reproducible_noise=true"]
    proc = run_tiny(tiny_cache, out, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["privacy"]["private"] is False and "reproducible_noise" in res["privacy"]["not_private_because"]  # seeded noise
    assert "this run is NOT private" in " ".join((proc.stdout + proc.stderr).split())  # the log says so (rich wraps lines)
    eps = [r["dp_epsilon"] for r in res["rounds"]]
    assert eps == [pytest.approx(client_dp_epsilon(1.5, 1.0, r, 1e-5)) for r in (1, 2)] and eps[0] < eps[1]  # 2 of 2 clients a round
    assert res["final"]["client_dp"] == {"epsilon": eps[1], "delta": 1e-5, "noise_multiplier": 1.5, "clip_norm": 0.5, "sample_rate": 1.0,
                                         "accountant": "opacus RDP"}
    assert all(r["aggregated"] for r in res["rounds"])
    assert json.loads((out / "privacy_spent.json").read_text()) == {"releases": 2, "dp_sgd": {}}  # what a resume starts from


def test_a_fednano_run_under_client_dp_merges_with_noised_fisher_weights(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    proc = run_tiny(tiny_cache, out, 'federation.strategy="fednano"', "privacy.client_dp=true", "privacy.noise_multiplier=2.0",
                    'privacy.fisher_groups="rank"', "federation.rounds=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["dp_epsilon"] for r in res["rounds"]] == [pytest.approx(client_dp_epsilon(2.0 / 2**0.5, 1.0, r, 1e-5)) for r in (1, 2)]
    assert res["final"]["client_dp"]["noise_multiplier"] == 2.0 and all(r["aggregated"] for r in res["rounds"])
    assert "privacy" not in res  # secret noise: nothing to disclose


def test_randomized_response_keeps_the_answer_with_its_stated_probability():
    import math
    import random

    from fednano.privacy import keep_probability, randomized_response

    assert keep_probability(math.log(3), 3) == pytest.approx(3 / 5)  # e^ε / (e^ε + K − 1)
    assert keep_probability(0.0, 4) == pytest.approx(1 / 4) and keep_probability(5.0, 1) == 1.0
    rng = random.Random(0)
    draws = [randomized_response(1, 3, math.log(3), rng) for _ in range(30_000)]
    shares = [draws.count(i) / len(draws) for i in range(3)]
    assert shares == [pytest.approx(0.2, abs=0.01), pytest.approx(0.6, abs=0.01), pytest.approx(0.2, abs=0.01)]


def test_randomized_answers_are_drawn_once_per_sample_from_its_own_candidates():
    from fednano.data.samples import DataError, Sample
    from fednano.privacy import randomized_answers

    sets = {"answers": ["red", "blue", "green", "circle"], "mc": ["A", "B", "C", "D"]}
    samples = [Sample(f"s{i}", "q", "red") for i in range(200)]
    samples += [Sample(f"m{i}", "q", "B", candidates="mc", n_choices=2) for i in range(50)]
    once = randomized_answers(samples, sets, 0.5, seed=3)
    assert once == randomized_answers(samples, sets, 0.5, seed=3)  # every round and process draws the same
    assert once != randomized_answers(samples, sets, 0.5, seed=4)
    kept = sum(s.answer == "red" for s in once[:200]) / 200
    assert kept == pytest.approx(keep_probability_of(0.5, 4), abs=0.08) and {s.answer for s in once[:200]} <= set(sets["answers"])
    assert {s.answer for s in once[200:]} <= {"A", "B"}  # multiple choice: only its own choices
    assert [s.uid for s in once] == [s.uid for s in samples] and randomized_answers(samples[:5], sets, 50.0, 0) == samples[:5]
    with pytest.raises(DataError, match="privacy.label_epsilon: sample x's answer 'square'"):
        randomized_answers([Sample("x", "q", "square")], sets, 1.0, 0)


def keep_probability_of(eps: float, k: int) -> float:
    from fednano.privacy import keep_probability

    return keep_probability(eps, k)


def test_label_dp_is_refused_for_centralized_and_below_zero():
    from fednano.methods.registry import METHODS

    with pytest.raises(ConfigError, match="privacy.label_epsilon: 'centralized'"):
        METHODS["centralized"].check(load_config(TINY, {"privacy.label_epsilon": 1.0, "federation.strategy": "centralized"}))
    with pytest.raises(ConfigError, match="privacy.label_epsilon"):
        load_config(TINY, {"privacy.label_epsilon": -1.0})


def test_under_label_dp_the_audit_reads_only_the_answers_randomized_response_kept(tiny_bundle, tiny_cache, tmp_path):
    """A real run: clients train on randomized answers; the audit's server reads the labels in the clear, and only the kept
    ones are right (ε = 0.1 over easy-vqa's answer set keeps few)."""
    out = tmp_path / "run"
    sets = ["privacy.audit=true", "privacy.audit_samples=8", "privacy.audit_pool=20", 'split.protocol="activations"', "federation.rounds=1",
            "privacy.label_epsilon=0.1"]
    proc = run_tiny(tiny_cache, out, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = load_config(TINY, {"privacy.label_epsilon": 0.1})
    from fednano.data import load_task
    from fednano.data.partition import partitions
    from fednano.privacy import randomized_answers

    task = load_task(cfg)
    truth = [s for part in partitions(cfg) for s in part.train[:8]]
    sent = randomized_answers(truth, task.candidate_sets, 0.1, cfg.data.seed)
    assert 0 < sum(s.answer == t.answer for s, t in zip(sent, truth, strict=True)) < len(truth)  # some kept, some not
    read = res["zero_shot_leakage"]["answer_tokens_in_clear"]
    assert 0 < read < 1 and res["rounds"][0]["leakage"]["answer_tokens_in_clear"] == read
    k = max(len(c) for c in task.candidate_sets.values())
    assert res["privacy"] == {"label_epsilon": 0.1, "largest_answer_set": k,
                              "label_keep_probability": pytest.approx(keep_probability_of(0.1, k))}


def test_a_clients_job_trains_on_the_randomized_answers_and_tests_on_the_true_ones(tmp_path):
    from types import SimpleNamespace

    from fednano.data import load_task
    from fednano.data.partition import client_data
    from fednano.privacy import label_store
    from fednano.runtime.client import ClientJob

    cfg = load_config(TINY, {"privacy.label_epsilon": 0.5})
    task, data = load_task(cfg), client_data(cfg, 0)
    rt = SimpleNamespace(cfg=cfg, edge=SimpleNamespace(text_noise=None), split=None, task=task)
    jobs = [ClientJob(rt, data, 0, rnd, tmp_path) for rnd in (1, 2)]  # type: ignore[arg-type]
    stored = json.loads(label_store(tmp_path, 0).read_text())["answers"]
    assert jobs[0].data.train == jobs[1].data.train != data.train  # the same draw in every round
    assert [s.answer for s in jobs[0].data.train] == [stored[s.uid] for s in data.train]  # ... kept on the client's own disk
    assert jobs[0].data.test == data.test
    with pytest.raises(ConfigError, match="privacy.label_epsilon: the client keeps each answer's one randomized draw"):
        ClientJob(rt, data, 0, 1)  # type: ignore[arg-type]  # nowhere to keep the draw: refused, not redrawn each round

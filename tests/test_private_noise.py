"""Randomness that protects privacy is secret (issue #38): every privacy draw comes from OS entropy, so whoever holds
everything a client or the server receives (the config, the round, the partition, the global state) cannot redraw it; its
law is unchanged; randomized answers are drawn once per node and kept on its disk; client sampling under client DP is the
Poisson sampling its accountant assumes. `privacy.reproducible_noise` (tests only) brings back seeded draws.

Statistical checks use enough draws and a p-value floor of 1e-6 (or bounds of 7+ standard deviations): they cannot flake."""

import json
import math
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("scipy", reason="the noise-law tests use scipy's KS test (absent on the GPU machine)")

from scipy import stats

from fednano.client.dp_sgd import DPSGD, poisson_batches, privatize
from fednano.config import ConfigError, FederationConfig, load_config
from fednano.data.samples import Sample
from fednano.methods.combiners import ClientDP, ClientDPFisher, ServerMemory
from fednano.methods.topologies import Federated
from fednano.privacy import TextNoise, keep_probability, label_store, randomized_answers
from fednano.runtime.client import ClientJob
from fednano.split.label_private import LabelPrivateClient, noised_gradient
from tests.conftest import ROOT, TINY

P_FLOOR = 1e-6  # a KS test of the right law fails with this probability


def _job(cfg, state_dir=None, **edge) -> ClientJob:
    """A client's job for partition 0, round 1, with only what the noise needs (no model, no data)."""
    split = LabelPrivateClient("localhost:1", head=torch.zeros(4, 8), gradient_noise=1.0)  # no connection is made
    rt = SimpleNamespace(cfg=cfg, edge=SimpleNamespace(text_noise=TextNoise(1.0), **edge), split=split, task=None)
    return ClientJob(rt, SimpleNamespace(train=[], test=[]), 0, 1, state_dir)  # type: ignore[arg-type]


def _client_draws(job: ClientJob) -> dict[str, torch.Tensor]:
    """One draw of each client mechanism as this job makes them: embedding noise, gradient noise, DP-SGD's noise and batch."""
    dp = DPSGD.of(job.cfg, 50, job.cfg.train, torch.device("cpu"), job.noise_seed("dp-sgd"), job.noise_seed("dp-sgd-batches"))
    batch = next(poisson_batches(list(range(50)), 0.5, dp.sampler))  # type: ignore[arg-type]
    assert isinstance(job.rt.split, LabelPrivateClient) and isinstance(job.rt.edge.text_noise, TextNoise)
    return {"embedding": job.rt.edge.text_noise(torch.zeros(1, 4, 8)),
            "gradient": noised_gradient(torch.ones(4, 8), 1.0, job.rt.split._generator),
            "dp_sgd": privatize({"w": torch.zeros(16)}, 1.0, 1.0, 1.0, dp.generator)["w"],
            "dp_sgd_batch": torch.tensor(batch)}


def _server_draws(reproducible: bool) -> dict[str, torch.Tensor]:
    """One round's noised release of each client-DP combiner, from the same state and the same (single) reply."""
    ref, theta = {"x.A.weight": torch.zeros(2, 8)}, {"x.A.weight": torch.ones(2, 8)}
    fed = FederationConfig()
    avg = ClientDP(clip=1.0, noise_multiplier=1.0, expected_clients=2, reproducible=reproducible)
    fis = ClientDPFisher(clip=1.0, noise_multiplier=1.0, expected_clients=2, reproducible=reproducible)
    return {"client_dp": avg(ref, [theta], [None], [1.0], fed, ServerMemory())["x.A.weight"],
            "client_dp_fisher": fis(ref, [theta], [theta], [1.0], fed, ServerMemory())["x.A.weight"]}


# ----------------------------------------------------------------------------- (a) no one can redraw the noise
def test_two_clients_with_one_config_round_and_partition_draw_different_noise_of_every_kind():
    cfg = load_config(TINY, {"privacy.dp_sgd": True, 'split.protocol': "activations"})
    one, two = _client_draws(_job(cfg)), _client_draws(_job(cfg))
    for kind in one:
        assert not torch.equal(one[kind], two[kind]), f"{kind}: the same draw from the same public inputs"


def test_the_server_draws_different_client_dp_noise_from_the_same_state_and_replies():
    one, two = _server_draws(False), _server_draws(False)
    for kind in one:
        assert not torch.equal(one[kind], two[kind]), kind


def test_reproducible_noise_repeats_every_draw_and_is_refused_without_a_mechanism():
    cfg = load_config(TINY, {"privacy.dp_sgd": True, 'split.protocol': "activations", "privacy.reproducible_noise": True})
    one, two = _client_draws(_job(cfg)), _client_draws(_job(cfg))
    assert all(torch.equal(one[k], two[k]) for k in one)
    server = _server_draws(True), _server_draws(True)
    assert all(torch.equal(server[0][k], server[1][k]) for k in server[0])
    with pytest.raises(ConfigError, match="privacy.reproducible_noise: seeds the privacy noise of client_dp"):
        load_config(TINY, {"privacy.reproducible_noise": True})


def test_randomized_answers_and_client_samples_come_from_os_entropy():
    sets = {"answers": ["red", "blue", "green", "circle"]}
    samples = [Sample(f"s{i}", "q", "red") for i in range(200)]
    assert randomized_answers(samples, sets, 0.5) != randomized_answers(samples, sets, 0.5)  # P(equal) < 0.27^200
    nodes, fed = list(range(20)), FederationConfig(fraction_train=0.5)
    dp = ClientDP()
    rounds = [[Federated().sample(nodes, r, fed, dp.sampler(fed.seed, r)) for r in range(1, 21)] for _ in range(2)]
    assert rounds[0] != rounds[1]  # P(equal) = 2^-400


# ----------------------------------------------------------------------------- (b) the laws are unchanged
def test_the_secret_gaussian_noise_has_its_stated_law():
    """DP-FedAvg: (sum + N(0, (σC)²)) / m; DP-SGD: the same over the expected batch; gradient noise: N(0, (level‖g_i‖/√d)²)."""
    d = 50_000
    ref, fed = {"w": torch.zeros(d)}, FederationConfig()
    server = ClientDP(clip=0.5, noise_multiplier=2.0, expected_clients=4)(ref, [ref], [None], [1.0], fed, ServerMemory())["w"]
    assert stats.kstest(server.double().numpy(), "norm", args=(0, 2.0 * 0.5 / 4)).pvalue > P_FLOOR
    job = _job(load_config(TINY, {"privacy.dp_sgd": True, 'split.protocol': "activations"}))
    sgd = privatize({"w": torch.zeros(d)}, clip=0.5, noise_multiplier=2.0, expected_batch=4.0,
                    generator=torch.Generator().manual_seed(job.noise_seed("dp-sgd")))["w"]
    assert stats.kstest(sgd.double().numpy(), "norm", args=(0, 0.25)).pvalue > P_FLOOR
    assert isinstance(job.rt.split, LabelPrivateClient)
    g = torch.randn(500, 100, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 500).unsqueeze(1)
    z = (noised_gradient(g, 0.7, job.rt.split._generator) - g) / (0.7 * g.norm(dim=1, keepdim=True) / 10)
    assert stats.kstest(z.flatten().double().numpy(), "norm").pvalue > P_FLOOR


def test_the_secret_embedding_noise_has_the_multivariate_laplace_law():
    """Norm ~ Gamma(d, 1/ε), direction uniform (each coordinate of z/‖z‖ has mean 0 and variance 1/d)."""
    n, d, eps = 20_000, 16, 2.0
    z = TextNoise(eps)(torch.zeros(1, n, d))[0].double()
    assert stats.kstest(z.norm(dim=1).numpy(), "gamma", args=(d, 0, 1 / eps)).pvalue > P_FLOOR
    unit = z / z.norm(dim=1, keepdim=True)
    assert float(unit.mean(0).abs().max()) < 7 / math.sqrt(n * d) and float((unit.var(0) * d - 1).abs().max()) < 0.1


def test_secret_randomized_response_keeps_the_answer_with_its_stated_probability():
    n, k, eps = 20_000, 4, 1.0
    sets = {"answers": ["red", "blue", "green", "circle"]}
    drawn = randomized_answers([Sample(f"s{i}", "q", "blue") for i in range(n)], sets, eps)
    p = keep_probability(eps, k)
    shares = [sum(s.answer == a for s in drawn) / n for a in sets["answers"]]
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(shares[1] - p) < 7 * sd and all(abs(x - (1 - p) / 3) < 7 * sd for i, x in enumerate(shares) if i != 1)


# ----------------------------------------------------------------------------- (c) label DP is drawn once per node
def test_a_nodes_randomized_answers_are_drawn_once_and_reused_by_a_fresh_process(tmp_path):
    sets = {"answers": ["red", "blue", "green", "circle"]}
    samples = [Sample(f"s{i}", "q", "red") for i in range(100)]
    store = label_store(tmp_path, 3)
    first = randomized_answers(samples[:60], sets, 0.5, store=store)
    again = randomized_answers(samples, sets, 0.5, store=store)  # 40 new samples: drawn and added; the 60 kept
    assert again[:60] == first and len(json.loads(store.read_text())["answers"]) == 100
    code = ("import json, sys; from fednano.data.samples import Sample; from fednano.privacy import randomized_answers; "
            "from pathlib import Path; s = [Sample(f's{i}', 'q', 'red') for i in range(100)]; "
            "a = randomized_answers(s, {'answers': ['red', 'blue', 'green', 'circle']}, 0.5, store=Path(sys.argv[1])); "
            "print(json.dumps([x.answer for x in a]))")
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == [s.answer for s in again]  # another process reads the node's draws, draws nothing
    with pytest.raises(ConfigError, match="privacy.label_epsilon: .* drawn at epsilon 0.5, not 1"):
        randomized_answers(samples, sets, 1.0, store=store)  # another ε would release every answer again


# ----------------------------------------------------------------------------- (d) client sampling follows the accountant
def test_client_dp_samples_each_node_independently_with_probability_fraction_train():
    """Over 4000 rounds each node's participation is Binomial(4000, q) (within 7 sd), and so is every round's count
    around q N: the law the RDP accountant's sample rate q assumes."""
    nodes, rounds, q = list(range(10)), 4000, 0.3
    fed, dp = FederationConfig(fraction_train=q), ClientDP()
    picked = [Federated().sample(nodes, r, fed, dp.sampler(fed.seed, r)) for r in range(rounds)]
    sd = math.sqrt(rounds * q * (1 - q))
    assert all(abs(sum(n in p for p in picked) - rounds * q) < 7 * sd for n in nodes)
    sizes = [len(p) for p in picked]
    assert abs(sum(sizes) / rounds - q * len(nodes)) < 7 * math.sqrt(len(nodes) * q * (1 - q) / rounds)
    assert 0 in sizes and max(sizes) > 6  # the count varies: no fixed-size sample (P(no empty round) = (1 - 0.7^10)^4000 ~ 1e-49)
    assert Federated().sample(nodes, 1, fed) == sorted(random.Random(f"{fed.seed}-1").sample(nodes, 3))  # without DP: seeded, fixed


def test_a_client_dp_round_releases_its_noise_even_when_no_client_took_part():
    """Keeping the previous adapters when few clients replied would tell whoever sees the model how many took part."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fednano.federation.strategy import FedNanoStrategy

    fed = FederationConfig(strategy="fedavg", fraction_train=0.5, min_train_clients=2)
    strategy = FedNanoStrategy(fed, combine=ClientDP(clip=1.0, noise_multiplier=1.0, expected_clients=1.0))

    start = {"x.A.weight": torch.zeros(2, 3)}
    grid = SimpleNamespace(get_node_ids=lambda: [])
    assert list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord({}), grid)) == []  # type: ignore[arg-type]
    merged, metrics = strategy.aggregate_train(1, [])
    assert merged is not None and metrics is None
    assert not torch.equal(merged.to_torch_state_dict()["x.A.weight"], start["x.A.weight"])  # the noise alone
    ffa = FedNanoStrategy(FederationConfig(strategy="fednano-ffa", fraction_train=0.5),
                          combine=ClientDPFisher(clip=1.0, noise_multiplier=1.0, expected_clients=1.0))
    start |= {"x.B.weight": torch.zeros(3, 2)}
    list(ffa.configure_train(1, ArrayRecord(start), ConfigRecord({}), grid))  # type: ignore[arg-type]
    out = ffa.aggregate_train(1, [])[0]
    assert out is not None and torch.equal(out.to_torch_state_dict()["x.A.weight"], start["x.A.weight"])  # FFA's A: frozen, not noised
    assert not torch.equal(out.to_torch_state_dict()["x.B.weight"], start["x.B.weight"])


def test_the_fixed_denominator_is_the_expected_number_of_poisson_sampled_clients():
    from fednano.methods.registry import METHODS, expected_clients

    cfg = load_config(TINY, {"data.num_clients": 5, "federation.fraction_train": 0.3, "privacy.client_dp": True,
                             "federation.strategy": "fedavg"})
    assert expected_clients(cfg) == pytest.approx(1.5)  # q N, not rounded
    for name in ("fedavg", "fednano"):
        combiner = METHODS[name].combiner(load_config(TINY, {"data.num_clients": 5, "federation.fraction_train": 0.3,
                                                             "privacy.client_dp": True, "federation.strategy": name}))
        assert isinstance(combiner, (ClientDP, ClientDPFisher)) and combiner.expected_clients == pytest.approx(1.5)


def test_a_run_with_seeded_noise_is_its_own_row_in_reports_and_says_so():
    from fednano.experiments.report import LABELLED, privacy_label

    assert ("privacy", "reproducible_noise") in LABELLED
    label = privacy_label({"client_dp": True, "noise_multiplier": 1.0, "reproducible_noise": True})
    assert label == "client DP σ=1, seeded noise, not private"

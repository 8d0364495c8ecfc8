"""Sample-level DP-SGD on the NanoAdapters (privacy.dp_sgd): the clipping and noise against hand-computed values and
against Opacus's DPOptimizer, the per-sample gradients against autograd, the accountant, the refusals, and a real run."""

import json

import pytest
import torch

from fednano.client.dp_sgd import DPSGD, clip_and_sum, poisson_batches, privatize, sample_gradients
from fednano.client.features import ImageFeatures, Workload
from fednano.client.training import split_step, train_local
from fednano.config import ConfigError, load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.methods.fisher_sources import FisherOfTraining, FisherPass
from fednano.methods.registry import METHODS
from fednano.privacy import dp_sgd_ledger, noise_for_epsilon, rdp_epsilon, worst_epsilon
from tests.conftest import TINY, randomize_adapters, run_tiny


def test_clipping_by_hand():
    """Sample 0 has norm 5 over both tensors together (3 and 4): scaled to C = 1; sample 1 (norm 0.5) is left alone."""
    per_sample = {"a": torch.tensor([[3.0], [0.3]]), "b": torch.tensor([[4.0], [0.4]])}
    sums, norms = clip_and_sum(per_sample, clip=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(sums["a"], torch.tensor([3.0 / 5 + 0.3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sums["b"], torch.tensor([4.0 / 5 + 0.4]), atol=1e-6, rtol=0)


def test_the_noise_has_std_sigma_times_clip_over_the_expected_batch(device):
    sums = {"w": torch.full((200, 100), 8.0, device=device)}
    g = torch.Generator(device=device).manual_seed(0)
    out = privatize(sums, clip=0.5, noise_multiplier=2.0, expected_batch=4.0, generator=g)["w"]
    assert out.device.type == device.type
    assert float(out.mean()) == pytest.approx(2.0, abs=0.01)  # 8 / 4
    assert float(out.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02)
    torch.testing.assert_close(privatize(sums, 0.5, 0.0, 4.0, g)["w"], sums["w"] / 4)  # no noise: the clipped mean


def test_clipping_and_averaging_equal_opacus_dp_optimizer():
    """With no noise, our clipped mean gradient is the one Opacus's DPOptimizer computes from the same per-sample grads."""
    from opacus.optimizers import DPOptimizer

    g = torch.Generator().manual_seed(0)
    per_sample = {"A": torch.randn(6, 3, 5, generator=g), "B": torch.randn(6, 5, 3, generator=g) * 3}
    params = {k: torch.nn.Parameter(torch.zeros(v.shape[1:])) for k, v in per_sample.items()}
    opt = DPOptimizer(torch.optim.SGD(list(params.values()), lr=1.0), noise_multiplier=0.0, max_grad_norm=2.0, expected_batch_size=6,
                      loss_reduction="mean")
    for k, p in params.items():
        p.grad_sample = per_sample[k].clone()
    opt.step()
    sums, _ = clip_and_sum(per_sample, clip=2.0)
    ours = privatize(sums, 2.0, 0.0, 6.0, torch.Generator().manual_seed(1))
    for k, p in params.items():
        torch.testing.assert_close(-p.detach(), ours[k], rtol=1e-5, atol=1e-6)  # SGD at lr 1 from 0: minus the gradient


def test_poisson_batches_take_each_sample_with_the_rate():
    samples = list(range(1000))
    g = torch.Generator().manual_seed(0)
    sizes = [len(next(poisson_batches(samples, 0.05, g))) for _ in range(200)]  # type: ignore[arg-type]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05) and len(set(sizes)) > 5  # the size varies
    assert next(poisson_batches(samples, 1.0, g)) == samples  # type: ignore[arg-type]
    assert next(poisson_batches(samples, 0.0, g)) == []  # type: ignore[arg-type]


def test_per_sample_gradients_are_each_samples_own(tiny_edge, tiny_llm):
    """Row i of sample_gradients is the gradient of sample i's summed answer NLL, as autograd gives it for that sample alone."""
    edge = tiny_edge.edge
    work = Workload(tiny_edge.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    randomize_adapters(edge, seed=2)
    samples = list(load_split("train")[:3])
    _, per_sample = sample_gradients(edge, tiny_llm, *work.train_batch(samples))
    for i, s in enumerate(samples):
        edge.zero_grad(set_to_none=True)
        batch, feats = work.train_batch([s])
        split_step(edge, tiny_llm, batch, feats)  # mean over this sample's answer tokens
        n_tok = int((batch.labels != -100).sum())
        for k, p in edge.adapter_parameters().items():
            torch.testing.assert_close(per_sample[k][i], p.grad * n_tok, rtol=1e-3, atol=1e-7)


def test_a_dp_sgd_step_at_zero_noise_is_the_clipped_mean(tiny_edge, tiny_llm):
    """train_local's DP step leaves in .grad exactly the clipped mean over the Poisson batch (σ = 0), and a huge clip
    leaves the per-sample gradients' mean."""
    edge = tiny_edge.edge
    work = Workload(tiny_edge.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    randomize_adapters(edge, seed=4)
    samples = list(load_split("train")[:4])
    params = edge.adapter_parameters()
    dp = DPSGD(clip=1e9, noise_multiplier=0.0, rate=1.0, n=4, generator=torch.Generator().manual_seed(0))
    dp.step(edge, tiny_llm, work.train_batch(samples), params)
    _, per_sample = sample_gradients(edge, tiny_llm, *work.train_batch(samples))
    for k, p in params.items():
        torch.testing.assert_close(p.grad, per_sample[k].mean(0), rtol=1e-5, atol=1e-9)
    assert dp.step(edge, tiny_llm, None, params) is None  # an empty batch: no loss, zero (noise-free) gradient
    assert all(float(p.grad.abs().sum()) == 0 for p in params.values())


def test_train_local_under_dp_sgd_moves_the_adapters_and_repeats(tiny_edge, tiny_llm):
    edge = tiny_edge.edge
    work = Workload(tiny_edge.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    cfg = load_config(TINY).train
    samples = list(load_split("train")[:40])
    start = edge.adapter_state()
    ends = []
    for _ in range(2):
        edge.load_adapter_state(start)
        dp = DPSGD(clip=1.0, noise_multiplier=0.5, rate=cfg.batch_size / 40, n=40, generator=torch.Generator().manual_seed(7))
        loss = train_local(edge, tiny_llm, samples, work, cfg, torch.Generator().manual_seed(3), dp=dp)
        assert loss > 0
        ends.append(edge.adapter_state())
    assert any(not torch.equal(ends[0][k], start[k]) for k in start)
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in start)  # seeded: the same noise and batches
    edge.load_adapter_state(start)


def test_the_ledger_adds_each_clients_steps_over_its_rounds():
    earlier = [{"0": {"steps": 10, "epsilon": 1.0}}, {"1": {"steps": 10, "epsilon": 1.0}}]
    led = dp_sgd_ledger(earlier, {"0": (1.1, 0.1, 10), "2": (1.1, 0.1, 10)}, 1e-5)
    assert led["0"]["steps"] == 20 and led["2"]["steps"] == 10 and "1" not in led
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=1.1, sample_rate=0.1)
    assert led["0"]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))  # Opacus's accountant, stepped one by one
    assert led["2"]["epsilon"] == pytest.approx(rdp_epsilon(1.1, 0.1, 10, 1e-5))
    assert led["2"]["epsilon"] < led["0"]["epsilon"]
    assert worst_epsilon([*earlier, led]) == led["0"]["epsilon"]
    assert rdp_epsilon(0.0, 0.1, 5, 1e-5) == float("inf") and rdp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_the_noise_for_a_target_epsilon_spends_it():
    sigma = noise_for_epsilon(8.0, 1e-5, 0.05, 300)
    assert rdp_epsilon(sigma, 0.05, 300, 1e-5) == pytest.approx(8.0, abs=0.02)
    assert noise_for_epsilon(1.0, 1e-5, 0.05, 300) > sigma  # a tighter budget needs more noise


ON = {"privacy.dp_sgd": True, "split.protocol": "activations"}


def test_bad_dp_sgd_settings_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="privacy.dp_sgd"):
        load_config(TINY, {**ON, "privacy.client_dp": True})
    with pytest.raises(ConfigError, match="privacy.dp_sgd.*split.protocol"):
        load_config(TINY, {"privacy.dp_sgd": True})  # the tiny config's cached protocol
    with pytest.raises(ConfigError, match="privacy.dp_sgd.*adapter.dropout"):
        load_config(TINY, {**ON, "adapter.dropout": 0.1})
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        load_config(TINY, {"privacy.target_epsilon": 8.0})
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        load_config(TINY, {**ON, "privacy.target_epsilon": -1.0})
    for name in ("fedit-lora", "feddpa-f"):
        with pytest.raises(ConfigError, match=f"privacy.dp_sgd: '{name}'"):
            METHODS[name].check(load_config(TINY, {**ON, "federation.strategy": name}))


def test_fisher_merging_takes_its_fisher_from_the_noised_steps_under_dp_sgd():
    on = load_config(TINY, ON)
    assert isinstance(METHODS["fednano"].fisher_source(on), FisherOfTraining)
    assert isinstance(METHODS["fednano"].fisher_source(load_config(TINY)), FisherPass)
    assert not METHODS["fedavg"].fisher_source(on).sends_fisher


def test_a_dp_sgd_run_spends_its_target_epsilon_and_reports_each_clients_ledger(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    proc = run_tiny(tiny_cache, out, 'federation.strategy="fednano"', "privacy.dp_sgd=true", "privacy.target_epsilon=8",
                    'split.protocol="activations"',
                    "federation.rounds=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = load_config(TINY)
    steps = cfg.train.local_steps
    first, second = (r["dp_sgd"] for r in res["rounds"])
    assert set(first) == set(second) == {str(i) for i in range(cfg.data.num_clients)}  # every client trains every round
    assert all(e["steps"] == steps for e in first.values()) and all(e["steps"] == 2 * steps for e in second.values())
    assert all(e["epsilon"] == pytest.approx(8.0, abs=0.05) for e in second.values())  # calibrated to the run's rounds
    assert all(e["epsilon"] < 8.0 for e in first.values())
    assert res["final"]["dp_sgd"]["epsilon"] == max(e["epsilon"] for e in second.values())
    assert all(r["aggregated"] for r in res["rounds"])

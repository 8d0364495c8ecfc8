import math

import pytest
import torch

from fednano.aggregation import STRATEGIES, fedavg, fisher_merge, normalize_fisher, proximal_term, validate_update


def T(*v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


def test_fedavg_hand_computed():
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]
    out = fedavg([T(1, 2), T(5, 6)], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))


def test_fisher_merge_hand_computed():
    thetas = [T(1.0, 2.0), T(3.0, 4.0)]
    fishers = [T(1.0, 0.0), T(3.0, 2.0)]
    n = [2, 1]
    out = fisher_merge(thetas, fishers, n, floor=1e-6)
    # element 0: (2*1*1 + 1*3*3) / (2*1 + 1*3) = 11/5
    # element 1: (2*1e-6*2 + 1*2*4) / (2*1e-6 + 1*2) ~= 4 (client 1's Fisher is ~0 there)
    assert out["w"][0].item() == pytest.approx(11 / 5)
    assert out["w"][1].item() == pytest.approx((4e-6 + 8) / (2e-6 + 2), rel=1e-6)


def test_fisher_merge_equals_fedavg_when_fishers_equal():
    g = torch.Generator().manual_seed(0)
    thetas = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    same = {"a": torch.rand(3, 4, generator=g) + 0.1, "b": torch.rand(5, generator=g) + 0.1}
    n = [10, 3, 7]
    merged = fisher_merge(thetas, [same] * 3, n)
    avg = fedavg(thetas, n)
    for k in avg:
        assert torch.allclose(merged[k], avg[k], atol=1e-6)


def test_fisher_floor_makes_all_zero_fisher_a_fedavg():
    out = fisher_merge([T(1.0), T(3.0)], [T(0.0), T(0.0)], [1, 1], floor=1e-6)
    assert out["w"].item() == pytest.approx(2.0)


def test_normalize_fisher_scales_to_mean_one():
    f = normalize_fisher({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([4.0])})
    # mean of all entries = 8/3
    assert torch.allclose(f["a"], torch.tensor([3 / 8, 9 / 8]))
    assert torch.allclose(f["b"], torch.tensor([12 / 8]))


def test_normalized_merge_ignores_fisher_scale():
    thetas = [T(0.0, 0.0), T(1.0, 1.0)]
    # client 1's Fisher is client 0's times 1000: after normalisation both weigh equally
    out = fisher_merge(thetas, [T(1.0, 1.0), T(1000.0, 1000.0)], [1, 1], normalize=True)
    assert torch.allclose(out["w"], torch.tensor([0.5, 0.5]))


def test_registry():
    assert {k: (m.fisher, m.proximal) for k, m in STRATEGIES.items()} == {
        "fednano": ("pass", False), "fednano-ef": ("training", False), "fedavg": ("none", False), "fedprox": ("none", True)}


def test_proximal_term_and_its_gradient_hand_computed():
    p = {"w": torch.tensor([1.0, 3.0], requires_grad=True)}
    anchor = {"w": torch.tensor([0.0, 1.0])}
    term = proximal_term(p, anchor, mu=0.5)
    # 0.5/2 * ((1-0)^2 + (3-1)^2) = 0.25 * 5 = 1.25; gradient mu * (p - anchor) = (0.5, 1.0)
    assert term.item() == pytest.approx(1.25)
    term.backward()
    assert torch.allclose(p["w"].grad, torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("theta", "fisher", "n", "needle"),
    [
        ({"w": torch.tensor([math.nan, 0.0])}, None, 1, "NaN"),
        ({"w": torch.tensor([math.inf, 0.0])}, None, 1, "NaN or Inf"),
        ({"w": torch.zeros(3)}, None, 1, "shape"),
        ({"v": torch.zeros(2)}, None, 1, "keys"),
        ({"w": torch.zeros(2)}, {"w": torch.tensor([-1.0, 0.0])}, 1, "negative"),
        ({"w": torch.zeros(2)}, {"w": torch.tensor([math.nan, 0.0])}, 1, "fisher.w"),
        ({"w": torch.zeros(2)}, None, 0, "num-examples"),
        ({"w": torch.zeros(2)}, None, math.nan, "num-examples"),
    ],
)
def test_validate_update_rejects_bad_updates(theta, fisher, n, needle):
    problems = validate_update({"w": torch.zeros(2)}, theta, fisher, n)
    assert problems and any(needle in p for p in problems)


def test_validate_update_accepts_good_update():
    assert validate_update({"w": torch.zeros(2)}, {"w": torch.ones(2)}, {"w": torch.ones(2)}, 5) == []


def test_update_norm_bound():
    ref = {"w": torch.zeros(2)}
    assert validate_update(ref, {"w": torch.tensor([3.0, 4.0])}, None, 1, max_norm=5.0) == []  # norm exactly 5
    problems = validate_update(ref, {"w": torch.tensor([30.0, 40.0])}, None, 1, max_norm=5.0)
    assert problems == ["update norm 50 exceeds federation.max_update_norm=5"]
    assert validate_update(ref, {"w": torch.tensor([30.0, 40.0])}, None, 1) == []  # 0 = no bound

import math

import pytest
import torch

from fednano.aggregation import (
    clip_to_norm,
    dp_fedavg,
    dp_fisher_merge,
    fedavg,
    fisher_merge,
    low_rank_factors,
    normalize_fisher,
    product_merge,
    proximal_term,
    server_opt_step,
    validate_update,
)
from fednano.methods.registry import METHODS


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
    assert {k: tuple(m.describe().values()) for k, m in METHODS.items()} == {
        "fednano": ("fisher", "pass", False, "", "federated", "nanoedge", False),
        "fednano-ef": ("fisher", "training", False, "", "federated", "nanoedge", False),
        "fednano-product": ("fisher-product", "pass", False, "", "federated", "nanoedge", False),
        "fednano-ffa": ("fisher", "pass", False, "", "federated", "nanoedge-ffa", False),
        "fedavg": ("average", "none", False, "", "federated", "nanoedge", False),
        "fedprox": ("average", "none", True, "", "federated", "nanoedge", False),
        "fedadam": ("average", "none", False, "adam", "federated", "nanoedge", False),
        "fedyogi": ("average", "none", False, "yogi", "federated", "nanoedge", False),
        "local": ("average", "none", False, "", "local", "nanoedge", False),
        "centralized": ("average", "none", False, "", "centralized", "nanoedge", False),
        "fedit-lora": ("average", "none", False, "", "federated", "full-mllm", False),
        "feddpa-f": ("average", "none", False, "", "federated", "full-mllm", True),
    }


OPT = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def test_server_adam_and_yogi_hand_computed():
    # step 1 from a fresh state, delta = 0.1: m = 0.01, v = 1e-4 (Adam and Yogi alike),
    # Adam's bias correction at t=1: eta * sqrt(1 - 0.99) / (1 - 0.9) = eta; theta = 0.01 * 0.01 / (0.01 + 0.001)
    cur, agg = {"w": torch.tensor([0.0])}, {"w": torch.tensor([0.1])}
    for kind in ("adam", "yogi"):
        out, st = server_opt_step(kind, cur, agg, {}, **OPT)
        assert math.isclose(float(out["w"]), 0.01 * 0.01 / 0.011, rel_tol=1e-6)
        assert (
            int(st["step"]) == 1
            and math.isclose(float(st["m.w"]), 0.01, rel_tol=1e-6)
            and math.isclose(float(st["v.w"]), 1e-4, rel_tol=1e-5)
        )
    # step 2, delta = 0.2 (d^2 = 0.04 > v): m = 0.9*0.01 + 0.1*0.2 = 0.029
    #   Adam: v = 0.99e-4 + 0.01*0.04 = 4.99e-4, eta_2 = 0.01 sqrt(1 - 0.99^2) / (1 - 0.9^2)
    #   Yogi: v = 1e-4 - 0.01*0.04*sign(1e-4 - 0.04) = 5e-4, eta = 0.01
    _, st = server_opt_step("adam", cur, agg, {}, **OPT)
    out, st2 = server_opt_step("adam", {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.2])}, st, **OPT)
    eta2 = 0.01 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert math.isclose(float(st2["v.w"]), 4.99e-4, rel_tol=1e-5)
    assert math.isclose(float(out["w"]), 1.0 + eta2 * 0.029 / (math.sqrt(4.99e-4) + 1e-3), rel_tol=1e-5)
    _, st = server_opt_step("yogi", cur, agg, {}, **OPT)
    out, st2 = server_opt_step("yogi", {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.2])}, st, **OPT)
    assert math.isclose(float(st2["v.w"]), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(out["w"]), 1.0 + 0.01 * 0.029 / (math.sqrt(5e-4) + 1e-3), rel_tol=1e-5)
    with pytest.raises(ValueError, match="server optimiser"):
        server_opt_step("sgd", cur, agg, {}, **OPT)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_server_optimiser_matches_flowers_fedadam_and_fedyogi(kind):
    """Same maths as Flower's FedAdam / FedYogi (whose step count is server_round + 1)."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam, FedYogi
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    g = torch.Generator().manual_seed(0)
    current = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    flower = (FedAdam if kind == "adam" else FedYogi)(eta=OPT["lr"], beta_1=OPT["beta1"], beta_2=OPT["beta2"], tau=OPT["tau"])
    ours_state: dict = {}
    for rnd in (1, 2, 3):
        clients = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in current.items()} for _ in range(2)]
        flower.current_arrays = {k: v.numpy().copy() for k, v in current.items()}
        replies = [
            Message(
                content=RecordDict(
                    {"arrays": ArrayRecord({k: v.clone() for k, v in c.items()}), "metrics": MetricRecord({"num-examples": n})}
                ),
                dst_node_id=0,
                message_type="train",
            )
            for c, n in zip(clients, (10, 30), strict=True)
        ]
        f_arrays, _ = flower.aggregate_train(rnd, replies)
        if not ours_state:
            ours_state = {"step": torch.tensor([rnd])}  # Flower's t = server_round + 1
        mine, ours_state = server_opt_step(kind, current, fedavg(clients, [10, 30]), ours_state, **OPT)
        for k, v in f_arrays.to_torch_state_dict().items():
            np.testing.assert_allclose(mine[k].numpy(), v.numpy(), rtol=1e-4, atol=1e-6)
        current = mine


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


# ------------------------------------------------------------------ fednano-product and fednano-ffa
def test_product_merge_hand_computed():
    """w_k = n_k r_k c_k^T: entry (0, 0) weighs client 0 by 1*1*1 and client 1 by 1*3*1; entry (1, 1) by 1*1*2 and 1*1*2."""
    p0, p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[5.0, 2.0], [4.0, 3.0]])
    rows, cols = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])], [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])]
    out = product_merge([p0, p1], rows, cols, [1, 1])
    # (0,0): (1*1 + 3*5)/4 = 4; (0,1): (2*0 + 6*2)/8 = 1.5; (1,0): (1*0 + 1*4)/2 = 2; (1,1): (2*1 + 2*3)/4 = 2
    assert torch.allclose(out, torch.tensor([[4.0, 1.5], [2.0, 2.0]], dtype=torch.float64))
    # example counts scale a client's whole weight: n = (3, 1) with equal importance is the weighted average
    ones = [torch.ones(2), torch.ones(2)]
    assert torch.allclose(product_merge([p0, p1], ones, ones, [3, 1]), (3 * p0 + p1).double() / 4)


def test_low_rank_factors_is_the_truncated_svd_and_keeps_dead_directions_trainable():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a, b = low_rank_factors(full, 2, torch.zeros(2, 5))
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    assert torch.allclose(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-12)  # Eckart-Young: the best rank-2 product
    assert torch.allclose(a @ a.T, torch.diag(s[:2]), atol=1e-12) and torch.allclose(b.T @ b, torch.diag(s[:2]), atol=1e-12)
    # a rank-1 product at rank 2: the second direction keeps the fallback's A row and B = 0 there
    fallback = torch.randn(2, 5, generator=g, dtype=torch.float64)
    rank1 = torch.outer(torch.randn(6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64))
    a, b = low_rank_factors(rank1, 2, fallback)
    assert torch.allclose(b @ a, rank1, atol=1e-12) and torch.equal(a[1], fallback[1]) and not b[:, 1].any()
    a, b = low_rank_factors(torch.zeros(6, 5, dtype=torch.float64), 2, fallback)  # nothing learnt yet: A as it was, B = 0
    assert torch.equal(a, fallback) and not b.any()


def _adapters(g, d=6, r=2):
    return {"adapter_i.A.weight": torch.randn(r, d, generator=g), "adapter_i.B.weight": torch.randn(d, r, generator=g),
            "adapter_t.A.weight": torch.randn(r, d, generator=g), "adapter_t.B.weight": torch.randn(d, r, generator=g)}


def _product(state, name):
    return state[f"{name}.B.weight"].double() @ state[f"{name}.A.weight"].double()


def test_product_merging_with_equal_importance_is_the_rank_r_svd_of_the_average_product():
    from fednano.config import FederationConfig
    from fednano.methods.combiners import ProductMerge, ServerMemory

    g = torch.Generator().manual_seed(1)
    thetas = [_adapters(g) for _ in range(3)]
    same = {k: torch.ones_like(v) for k, v in thetas[0].items()}
    n = [4.0, 1.0, 3.0]
    merged = ProductMerge()(thetas[0], thetas, [same] * 3, n, FederationConfig(), ServerMemory())
    assert set(merged) == set(thetas[0]) and all(merged[k].shape == thetas[0][k].shape for k in merged)
    for name in ("adapter_i", "adapter_t"):
        average = sum(w * _product(t, name) for w, t in zip(n, thetas, strict=True)) / sum(n)
        u, s, vh = torch.linalg.svd(average, full_matrices=False)
        assert torch.allclose(_product(merged, name), u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5)
        # which is not what averaging the factors gives
        factors = fedavg(thetas, n)
        assert not torch.allclose(_product(factors, name), average, atol=1e-2)


def test_product_merging_one_client_returns_its_product():
    from fednano.config import FederationConfig
    from fednano.methods.combiners import ProductMerge, ServerMemory

    g = torch.Generator().manual_seed(2)
    theta, reference = _adapters(g), _adapters(g)
    fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in theta.items()}
    merged = ProductMerge()(reference, [theta], [fisher], [5.0], FederationConfig(), ServerMemory())
    for name in ("adapter_i", "adapter_t"):
        assert torch.allclose(_product(merged, name), _product(theta, name), atol=1e-5)


def test_ffa_shares_only_b_and_the_global_a_never_moves():
    """fednano-ffa: a client uploads (and the server validates and merges) B only; the next global state
    keeps the shared A; with A shared, merging the B's merges the products exactly (for FedAvg weights)."""
    from fednano.methods.registry import METHODS

    ffa, fednano = METHODS["fednano-ffa"], METHODS["fednano"]
    g = torch.Generator().manual_seed(3)
    reference = _adapters(g)
    assert sorted(ffa.trains.shared(reference)) == ["adapter_i.B.weight", "adapter_t.B.weight"]
    assert fednano.trains.shared(reference) == reference
    bs = [ffa.trains.shared(_adapters(g)) for _ in range(2)]
    merged = ffa.complete(reference, fedavg(bs, [1, 3]))
    for name in ("adapter_i", "adapter_t"):
        assert torch.equal(merged[f"{name}.A.weight"], reference[f"{name}.A.weight"])
        products = [b[f"{name}.B.weight"].double() @ reference[f"{name}.A.weight"].double() for b in bs]
        assert torch.allclose(_product(merged, name), (products[0] + 3 * products[1]) / 4, atol=1e-5)


def test_clipping_by_hand():
    up = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5 over both tensors
    clipped, norm = clip_to_norm(up, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0])) and torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))
    same, _ = clip_to_norm(up, 10.0)  # within the bound: unchanged
    assert torch.equal(same["a"], up["a"]) and torch.equal(same["b"], up["b"])


def test_dp_fedavg_by_hand_and_its_noise():
    ref = {"w": torch.tensor([1.0, 1.0])}
    thetas = [{"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.0, 1.5])}]  # updates (3, 4): norm 5 -> (0.6, 0.8); (0, 0.5) kept
    out = dp_fedavg(ref, thetas, clip=1.0, noise_multiplier=0.0, expected_clients=4, generator=None)
    torch.testing.assert_close(out["w"], torch.tensor([1.0 + 0.6 / 4, 1.0 + 1.3 / 4]))  # a fixed denominator: 4, not the 2 that came
    big = {"w": torch.zeros(20_000)}
    noisy = dp_fedavg(big, [big], clip=0.5, noise_multiplier=2.0, expected_clients=4, generator=torch.Generator().manual_seed(1))
    assert float(noisy["w"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)  # std sigma * C / m per entry
    again = dp_fedavg(big, [big], clip=0.5, noise_multiplier=2.0, expected_clients=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy["w"], again["w"])


def test_the_dp_combiner_draws_secret_noise_is_seeded_by_the_state_only_when_reproducible_and_keeps_the_server_optimiser():
    from fednano.config import FederationConfig
    from fednano.methods.combiners import ClientDP, ServerMemory, ServerOptimiser

    ref = {"w": torch.zeros(8)}
    thetas = [{"w": torch.ones(8)}]
    secret = ClientDP(clip=1.0, noise_multiplier=1.0, expected_clients=2)
    drawn = [secret(ref, thetas, [None], [1.0], FederationConfig(), ServerMemory())["w"] for _ in range(2)]
    assert not torch.equal(drawn[0], drawn[1])  # OS entropy: the same inputs, other noise (no one can redraw it)
    dp = ClientDP(clip=1.0, noise_multiplier=1.0, expected_clients=2, reproducible=True)  # privacy.reproducible_noise (tests)
    a = dp(ref, thetas, [None], [1.0], FederationConfig(), ServerMemory())
    b = dp(ref, thetas, [None], [1.0], FederationConfig(), ServerMemory())
    assert torch.equal(a["w"], b["w"])  # the same state draws the same noise
    c = dp({"w": torch.full((8,), 0.5)}, thetas, [None], [1.0], FederationConfig(), ServerMemory())
    assert not torch.equal(a["w"] - 0.0, c["w"] - 0.5)  # another state, other noise
    memory = ServerMemory()
    ClientDP(inner=ServerOptimiser("adam"), clip=1.0, noise_multiplier=1.0, expected_clients=2)(ref, thetas, [None], [1.0],
                                                                                                FederationConfig(), memory)
    assert set(memory.opt) == {"m.w", "v.w", "step"}  # the server's Adam stepped on the noised average


def _pair(a: list[list[float]], b: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"x.A.weight": torch.tensor(a), "x.B.weight": torch.tensor(b)}  # A (r=2, d=1), B (d=1, r=2)


def test_dp_fisher_merge_by_hand_with_one_weight_per_tensor():
    """Client 1's tensor sums (3, 4) scale to (0.6, 0.8)·sqrt(2), client 2's (1, 0) to (1, 0)·sqrt(2); no noise, no clipping:
    A = (0.6·Δ1 + 1·Δ2) / 1.6, B = Δ1 (client 2's weight on B is 0)."""
    ref = _pair([[0.0], [0.0]], [[0.0, 0.0]])
    thetas = [_pair([[1.0], [2.0]], [[1.0, 1.0]]), _pair([[3.0], [0.0]], [[5.0, 5.0]])]
    fishers = [_pair([[1.0], [2.0]], [[1.0, 3.0]]), _pair([[0.5], [0.5]], [[0.0, 0.0]])]
    out = dp_fisher_merge(ref, thetas, fishers, clip=1e9, noise_multiplier=0.0, expected_clients=1, generator=None)
    torch.testing.assert_close(out["x.A.weight"], torch.tensor([[2.25], [0.75]]))
    torch.testing.assert_close(out["x.B.weight"], torch.tensor([[1.0, 1.0]]))


def test_dp_fisher_merge_by_hand_with_one_weight_per_rank_component():
    """Row sums of A and column sums of B: client 1 (1, 3 | 2, 2), client 2 (3, 1 | 2, 2), the same norm: A's row 0 is
    (1·1 + 3·3) / 4, row 1 (3·2 + 1·0) / 4; B's columns weigh both clients equally."""
    ref = _pair([[0.0], [0.0]], [[0.0, 0.0]])
    thetas = [_pair([[1.0], [2.0]], [[1.0, 1.0]]), _pair([[3.0], [0.0]], [[5.0, 5.0]])]
    fishers = [_pair([[1.0], [3.0]], [[2.0, 2.0]]), _pair([[3.0], [1.0]], [[2.0, 2.0]])]
    out = dp_fisher_merge(ref, thetas, fishers, clip=1e9, noise_multiplier=0.0, expected_clients=1, generator=None, by_rank=True)
    torch.testing.assert_close(out["x.A.weight"], torch.tensor([[2.5], [1.5]]))
    torch.testing.assert_close(out["x.B.weight"], torch.tensor([[3.0, 3.0]]))


def test_dp_fisher_merge_clips_the_weighted_update_floors_the_weights_and_repeats_its_noise():
    ref = {"w.A.weight": torch.zeros(1, 2)}
    one = [{"w.A.weight": torch.tensor([[3.0, 4.0]])}]
    fisher = [{"w.A.weight": torch.ones(1, 2)}]  # one group: weight 1
    clipped = dp_fisher_merge(ref, one, fisher, clip=1.0, noise_multiplier=0.0, expected_clients=1, generator=None)
    torch.testing.assert_close(clipped["w.A.weight"], torch.tensor([[0.6, 0.8]]))  # norm 5 -> 1; weights' sum 1 > floor 0.5
    floored = dp_fisher_merge(ref, one, fisher, clip=1e9, noise_multiplier=0.0, expected_clients=10, generator=None)
    torch.testing.assert_close(floored["w.A.weight"], torch.tensor([[0.6, 0.8]]))  # sum of weights 1 floored to 10 / 2
    big = {"w.A.weight": torch.zeros(1, 20_000)}
    draws = [dp_fisher_merge(big, [big], [{"w.A.weight": torch.ones(1, 20_000)}], clip=0.5, noise_multiplier=2.0, expected_clients=4,
                             generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0]["w.A.weight"], draws[1]["w.A.weight"]) and float(draws[0]["w.A.weight"].abs().sum()) > 0

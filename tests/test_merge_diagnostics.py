"""The merge remedies and diagnostics of issue #37, against hand-computed values, and end to end on the tiny backbone."""

import json

import pytest
import torch

from fednano.aggregation import fedavg, fisher_merge, fisher_prior_merge, merge_weights
from fednano.config import FederationConfig
from fednano.diagnostics import cosine, factor_mismatch, merge_diagnostics, relative_error, weight_concentration
from fednano.experiments.diagnostics_plot import diagnostic_series
from fednano.methods.combiners import PRIOR_ROUNDS, FisherMerge, ServerMemory
from tests.test_methods import _run


def T(*v):
    return {"w": torch.tensor(v, dtype=torch.float64)}


def test_tempered_weights_hand_computed():
    # n * F^p: 2 * 4^0.5 = 4, 1 * 1^0.5 = 1; p = 0 leaves n_k
    w = merge_weights([T(4.0), T(1.0)], [2, 1], power=0.5)
    assert [float(x["w"]) for x in w] == pytest.approx([4.0, 1.0])
    assert [float(x["w"]) for x in merge_weights([T(4.0), T(1.0)], [2, 1], power=0.0)] == [2.0, 1.0]


def test_tempered_merge_between_fedavg_and_fisher():
    thetas, fishers, n = [T(0.0), T(1.0)], [T(9.0), T(1.0)], [1, 1]
    # p = 1: (9*0 + 1*1) / 10 = 0.1; p = 0.5: (3*0 + 1*1) / 4 = 0.25; p = 0: FedAvg's 0.5
    assert float(fisher_merge(thetas, fishers, n)["w"]) == pytest.approx(0.1)
    assert float(fisher_merge(thetas, fishers, n, power=0.5)["w"]) == pytest.approx(0.25)
    assert float(fisher_merge(thetas, fishers, n, power=0.0)["w"]) == pytest.approx(float(fedavg(thetas, n)["w"]))


def test_fisher_prior_merge_hand_computed():
    ref, thetas, weights = T(0.0), [T(1.0), T(3.0)], [T(1.0), T(3.0)]
    # no prior: (1*1 + 3*3) / (1 + 3) = 2.5, which is fisher_merge; prior 0.5 at weight 1 with N = 2: 10 / (4 + 1) = 2
    assert float(fisher_prior_merge(ref, thetas, weights, 2.0, None, 1.0)["w"]) == pytest.approx(2.5)
    assert float(fisher_prior_merge(ref, thetas, weights, 2.0, T(0.5), 1.0)["w"]) == pytest.approx(2.0)
    # the update is what is damped: from a reference of 1, (0 + 3*2) / 5 = 1.2 -> 2.2
    assert float(fisher_prior_merge(T(1.0), thetas, weights, 2.0, T(0.5), 1.0)["w"]) == pytest.approx(2.2)


def test_the_prior_combiner_keeps_a_running_mean_of_the_merge_weight():
    cfg, memory, merge = FederationConfig(fisher_prior=1.0, fisher_floor=1e-12), ServerMemory(), FisherMerge()
    ref = {"a.w": torch.zeros(1, dtype=torch.float64)}
    thetas, fishers = [{"a.w": torch.tensor([1.0], dtype=torch.float64)}, {"a.w": torch.tensor([3.0], dtype=torch.float64)}], \
        [{"a.w": torch.tensor([1.0], dtype=torch.float64)}, {"a.w": torch.tensor([3.0], dtype=torch.float64)}]
    first = merge(ref, thetas, fishers, [1, 1], cfg, memory)
    assert float(first["a.w"]) == pytest.approx(2.5)  # round 1: no prior yet, plain Fisher merging
    assert float(memory.prior["a.w"]) == pytest.approx(2.0) and float(memory.prior[PRIOR_ROUNDS]) == 1  # (1 + 3) / 2 examples
    second = merge(ref, thetas, [{"a.w": torch.tensor([3.0], dtype=torch.float64)}] * 2, [1, 1], cfg, memory)
    assert float(second["a.w"]) == pytest.approx((3 + 9) / (6 + 1.0 * 2 * 2.0))  # prior 2 from round 1
    assert float(memory.prior["a.w"]) == pytest.approx((2.0 + 3.0) / 2)  # running mean of 2 and 3
    restored = ServerMemory()
    restored.load_state_dict(memory.state_dict())  # checkpointed with the round
    assert float(restored.prior["a.w"]) == pytest.approx(2.5) and float(restored.prior[PRIOR_ROUNDS]) == 2


def test_weight_concentration_hand_computed():
    # shares per entry: client 0 [0.9, 0.5], client 1 [0.1, 0.5]
    per_tensor, shares = weight_concentration([T(9.0, 1.0), T(1.0, 1.0)])
    assert per_tensor["w"]["dominated"] == pytest.approx(0.5)
    assert per_tensor["w"]["effective_clients"] == pytest.approx((1 / 0.82 + 2.0) / 2)
    assert shares == pytest.approx([0.7, 0.3])


def test_factor_mismatch_hand_computed():
    ref = {"x.A.weight": torch.zeros(1, 1), "x.B.weight": torch.zeros(1, 1)}
    c1 = {"x.A.weight": torch.ones(1, 1), "x.B.weight": torch.ones(1, 1)}
    c2 = {"x.A.weight": 3 * torch.ones(1, 1), "x.B.weight": 3 * torch.ones(1, 1)}
    avg = fedavg([c1, c2], [1, 1])  # A = B = 2: B A = 4, the mean product (1 + 9) / 2 = 5
    assert factor_mismatch(avg, [c1, c2], [1, 1], ref) == {"x": pytest.approx(0.2)}
    # FFA: A is the reference's for every client, so averaging B is exact in the product
    ffa_ref = {"x.A.weight": torch.ones(1, 1), "x.B.weight": torch.zeros(1, 1)}
    b1, b2 = {"x.B.weight": torch.ones(1, 1)}, {"x.B.weight": 3 * torch.ones(1, 1)}
    assert factor_mismatch(fedavg([b1, b2], [1, 1]), [b1, b2], [1, 1], ffa_ref) == {"x": 0.0}


def test_merge_diagnostics_cosines_and_distance_to_fedavg():
    ref = T(0.0, 0.0)
    thetas, fishers = [T(1.0, 0.0), T(0.0, 1.0)], [T(3.0, 1.0), T(1.0, 3.0)]
    weights = merge_weights(fishers, [1, 1])
    merged = fisher_merge(thetas, fishers, [1, 1])  # [0.75, 0.75]: the same direction as FedAvg's [0.5, 0.5]
    d = merge_diagnostics(ref, thetas, fishers, weights, [1, 1], merged)
    assert [c["cosine_to_merged"] for c in d["clients"]] == pytest.approx([2 ** -0.5] * 2)
    assert [c["fisher_total"] for c in d["clients"]] == [4.0, 4.0]
    assert d["merged_update_norm"] / d["average_update_norm"] == pytest.approx(1.5)
    assert d["distance_to_average"] == pytest.approx(0.5)
    assert cosine(torch.zeros(2), torch.ones(2)) == 0.0
    assert relative_error(T(1.0, 1.0), T(2.0, 0.0)) == pytest.approx((1 + 1) ** 0.5 / 2)


def test_merge_diagnostics_recorded_per_round_for_fisher_and_plain_averaging(tiny_bundle, tiny_cache, tmp_path):
    """A tiny run of each with federation.merge_diagnostics: every round carries the numbers, per client by partition,
    the Fisher's error at validated rounds, and the plot; fedavg's clients send a Fisher for the diagnostics only."""
    for method in ("fednano", "fedavg"):
        out = tmp_path / method
        res = _run(tiny_cache, out, f"federation.strategy='{method}'", "federation.merge_diagnostics=true")
        (r,) = res["rounds"]
        d = r["merge_diagnostics"]
        assert set(d["clients"]) == {"0", "1"}
        assert sum(c["weight_share"] for c in d["clients"].values()) == pytest.approx(1.0)
        for c in d["clients"].values():
            assert c["fisher_total"] > 0 and -1 <= c["cosine_to_merged"] <= 1 and c["fisher_rel_error"] >= 0
        assert set(d["factor_mismatch"]) == {"adapter_i", "adapter_t"}
        assert all(1 <= t["effective_clients"] <= 2 for t in d["tensors"].values())
        if method == "fedavg":  # FedAvg's merge is the plain average: no distance to it; no Fisher counted as sent
            assert d["distance_to_average"] == pytest.approx(0.0, abs=1e-6) and r["bytes"]["fisher_up"] == 0
        assert (out / "merge_diagnostics.png").stat().st_size > 0
        assert diagnostic_series(json.loads((out / "results.json").read_text()))["weight share"]


def test_the_remedies_run_end_to_end(tiny_bundle, tiny_cache, tmp_path):
    """The Fisher at the received global adapters, a tempered Fisher and the server prior, together, over 2 rounds (the prior
    acts from round 2), through `fednano run`; the prior's running mean is checkpointed with the round."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    res = _run(tiny_cache, out, "federation.rounds=2", "federation.fisher_at='global'", "federation.fisher_power=0.5",
               "federation.fisher_prior=1.0")
    assert [r["clients_accepted"] for r in res["rounds"]] == [2, 2] and all(r["aggregated"] for r in res["rounds"])
    strategy = load_file(out / res["checkpoint"]["strategy"])
    assert float(strategy[f"prior.{PRIOR_ROUNDS}"]) == 2 and any(k.startswith("prior.adapter_") for k in strategy)


@pytest.mark.parametrize(("sets", "needle"), [
    ({"federation": {"strategy": "fednano-ef", "fisher_at": "global"}}, "federation.fisher_at"),
    ({"federation": {"strategy": "centralized", "merge_diagnostics": True}}, "federation.merge_diagnostics"),
    ({"federation": {"strategy": "fedit-lora", "merge_diagnostics": True}}, "federation.merge_diagnostics"),
    ({"federation": {"merge_diagnostics": True}, "privacy": {"client_dp": True}}, "federation.merge_diagnostics"),
    ({"federation": {"fisher_at": "before"}}, "federation.fisher_at"),
    ({"federation": {"fisher_power": -1.0}}, "federation.fisher_power"),
])
def test_settings_a_method_cannot_honour_are_refused(sets, needle):
    from fednano.config import ConfigError, from_dict
    from fednano.methods.registry import method_of

    with pytest.raises(ConfigError, match=needle):
        cfg = from_dict(sets, "test")
        method_of(cfg).check(cfg)

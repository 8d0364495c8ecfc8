"""What a run counts besides accuracy (federation/accounts.py), against hand-computed values."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr", reason="the federation layer needs Flower (absent on the GPU machine: benchmarks/gpu_checks.py)")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fednano.config import load_config
from fednano.federation import keys
from fednano.federation.accounts import PrivacyAccounts, Traffic
from fednano.federation.strategy import ClientOutcome
from fednano.privacy import rdp_epsilon
from tests.conftest import TINY


def test_a_rounds_bytes_are_every_message_tensor_and_every_clients_split_count():
    # Prepare: one message down holding 10 float32 (40 bytes); two training replies (one empty: it failed) and one
    # evaluation reply with split-channel counts; a client uploads 6 float32 (24 bytes)
    # (a Message needs a running Flower app to build; its content is all Traffic reads)
    sent = [SimpleNamespace(content=RecordDict({keys.ARRAYS: ArrayRecord({"w": torch.zeros(10)}), keys.CONFIG: ConfigRecord()}))]
    trained = [ClientOutcome(1, 0, {"activations_up": 100, "gradients_down": 50}), ClientOutcome(2, 1, {})]
    evaluated = [ClientOutcome(1, 0, {"eval_activations_up": 7})]
    uploaded = ArrayRecord({"a": torch.zeros(6)})
    # Execute
    with_fisher = Traffic.bytes(sent, trained, evaluated, uploaded, sends_fisher=True)
    without = Traffic.bytes(sent, trained, evaluated, uploaded, sends_fisher=False)
    # Assert
    assert with_fisher["adapters_down"] == 40 and with_fisher["adapters_up"] == 24 and with_fisher["fisher_up"] == 24
    assert (with_fisher["activations_up"], with_fisher["gradients_down"], with_fisher["eval_activations_up"]) == (100, 50, 7)
    assert without["fisher_up"] == 0 and without["adapters_up"] == 24


def test_dp_sgd_accounts_each_clients_ledger_from_what_it_reports():
    cfg = load_config(TINY, {"privacy.dp_sgd": True, "privacy.noise_multiplier": 1.0, "split.protocol": "activations"})
    accounts = PrivacyAccounts(cfg)
    reply = {keys.DP_SGD_SIGMA: 1.0, keys.DP_SGD_RATE: 0.1, keys.DP_SGD_STEPS: 3}
    first = accounts.spend([ClientOutcome(1, 0, reply)])
    second = accounts.spend([ClientOutcome(1, 0, reply)])
    assert first["dp_sgd"]["0"]["steps"] == 3 and second["dp_sgd"]["0"]["steps"] == 6  # the ledger adds the rounds
    assert first["dp_sgd"]["0"]["epsilon"] == rdp_epsilon(1.0, 0.1, 3, cfg.privacy.delta)
    assert 0 < first["dp_epsilon"] < second["dp_epsilon"] == rdp_epsilon(1.0, 0.1, 6, cfg.privacy.delta)
    assert accounts.final(second)["dp_sgd"]["epsilon"] == second["dp_epsilon"]
    assert PrivacyAccounts(load_config(TINY)).spend([]) == {"dp_epsilon": None} and not PrivacyAccounts(load_config(TINY)).local


def test_client_dp_spends_more_epsilon_each_round():
    cfg = load_config(TINY, {"privacy.client_dp": True, "privacy.noise_multiplier": 1.0})
    accounts = PrivacyAccounts(cfg)
    assert 0 < accounts.epsilon(1) < accounts.epsilon(2)
    assert [accounts.spend([])["dp_epsilon"] for _ in range(2)] == [accounts.epsilon(1), accounts.epsilon(2)]  # no replies: still a release
    assert accounts.final({"dp_epsilon": accounts.epsilon(2)})["client_dp"]["epsilon"] == accounts.epsilon(2)


def test_a_round_cut_after_its_release_counts_again_when_the_resumed_run_repeats_it(tmp_path):
    # Prepare: rounds 1 and 2 completed, then round 3 spent (its model went out) and was cut before its checkpoint;
    # a new server process resumes after round 2 and runs round 3 again. Client-level DP, then DP-SGD.
    spent = tmp_path / "privacy_spent.json"
    client_dp = load_config(TINY, {"privacy.client_dp": True, "privacy.noise_multiplier": 1.0})
    dp_sgd = load_config(TINY, {"privacy.dp_sgd": True, "privacy.noise_multiplier": 1.0, "split.protocol": "activations"})
    reply = [ClientOutcome(1, 0, {keys.DP_SGD_SIGMA: 1.0, keys.DP_SGD_RATE: 0.1, keys.DP_SGD_STEPS: 3})]
    results = {}
    for name, cfg in (("client_dp", client_dp), ("dp_sgd", dp_sgd)):
        first = PrivacyAccounts(cfg, spent)
        first.begin(0, [])
        rounds = [{"round": r, **first.spend(reply)} for r in (1, 2)]
        first.spend(reply)  # round 3, cut
        # Execute
        resumed = PrivacyAccounts(cfg, spent)
        resumed.begin(2, rounds)
        results[name] = (rounds, resumed.spend(reply))
    # Assert: 4 releases and 12 steps spent, not the 3 releases and 9 steps the completed rounds alone would say
    assert results["client_dp"][1]["dp_epsilon"] == PrivacyAccounts(client_dp).epsilon(4)
    assert results["dp_sgd"][1]["dp_sgd"]["0"]["steps"] == 12
    assert results["dp_sgd"][1]["dp_epsilon"] == rdp_epsilon(1.0, 0.1, 12, dp_sgd.privacy.delta)
    # a run from before the file existed resumes from what its completed rounds recorded; a new run starts from nothing
    rounds = results["dp_sgd"][0]
    spent.unlink()
    older = PrivacyAccounts(dp_sgd, spent)
    older.begin(2, rounds)
    assert older.spent == {"releases": 2, "dp_sgd": rounds[1]["dp_sgd"]}
    fresh = PrivacyAccounts(dp_sgd, spent)
    fresh.begin(0, rounds)
    assert fresh.spend(reply)["dp_sgd"]["0"]["steps"] == 3

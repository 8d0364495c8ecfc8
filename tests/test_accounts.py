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
    first = accounts.round(1, [ClientOutcome(1, 0, reply)], [])
    second = accounts.round(2, [ClientOutcome(1, 0, reply)], [{"round": 1, **first}])
    assert first["dp_sgd"]["0"]["steps"] == 3 and second["dp_sgd"]["0"]["steps"] == 6  # the ledger adds the rounds
    assert 0 < first["dp_epsilon"] < second["dp_epsilon"]
    assert accounts.final(second)["dp_sgd"]["epsilon"] == second["dp_epsilon"]
    assert PrivacyAccounts(load_config(TINY)).round(1, [], []) == {"dp_epsilon": None} and not PrivacyAccounts(load_config(TINY)).local


def test_client_dp_spends_more_epsilon_each_round():
    cfg = load_config(TINY, {"privacy.client_dp": True, "privacy.noise_multiplier": 1.0})
    accounts = PrivacyAccounts(cfg)
    assert 0 < accounts.epsilon(1) < accounts.epsilon(2)
    assert accounts.final({"dp_epsilon": accounts.epsilon(2)})["client_dp"]["epsilon"] == accounts.epsilon(2)

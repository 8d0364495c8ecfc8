"""FedNanoStrategy with hand-built Flower Messages: merging, and rejecting bad updates."""

import logging
import math

import pytest
import torch

pytest.importorskip("flwr", reason="the federation layer needs Flower (absent on the GPU machine: benchmarks/gpu_checks.py)")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fednano.aggregation import fisher_merge
from fednano.config import FederationConfig
from fednano.federation import keys
from fednano.federation.strategy import FedNanoStrategy


class _Nodes:
    """The part of a Grid that sampling reads (node ids); no transport involved."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


GLOBAL = {"adapter_i.A.weight": torch.zeros(2, 3), "adapter_i.B.weight": torch.zeros(3, 2)}


def _reply(instr, theta, fisher, n, pid, loss=1.0):
    content = RecordDict({
        keys.ARRAYS: ArrayRecord({k: v.clone() for k, v in theta.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.PARTITION_ID: pid, keys.TRAIN_LOSS: loss}),
    })
    if fisher is not None:
        content[keys.FISHER] = ArrayRecord({k: v.clone() for k, v in fisher.items()})
    return Message(content=content, reply_to=instr)


def _instructions(strategy, n=3):
    return list(strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({}), _Nodes(list(range(10, 10 + n)))))


def _like(value):
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def test_fednano_strategy_merges_with_fisher_and_weights():
    s = FedNanoStrategy(FederationConfig(strategy="fednano", min_train_clients=2))
    m = _instructions(s, 2)
    assert s.method.sends_fisher and len(m) == 2  # replies must carry a Fisher
    replies = [_reply(m[0], _like(1.0), _like(1.0), 10, 0, loss=2.0), _reply(m[1], _like(3.0), _like(3.0), 30, 1, loss=1.0)]
    arrays, metrics = s.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    want = fisher_merge([_like(1.0), _like(3.0)], [_like(1.0), _like(3.0)], [10, 30])
    for k in want:
        assert torch.allclose(got[k], want[k])
    # (10*1*1 + 30*3*3) / (10*1 + 30*3) = 280/100
    assert got["adapter_i.A.weight"][0, 0].item() == pytest.approx(2.8)
    assert metrics[keys.TRAIN_LOSS] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)


def test_bad_updates_are_rejected_with_client_ids(caplog):
    s = FedNanoStrategy(FederationConfig(strategy="fednano", min_train_clients=1))
    m = _instructions(s, 4)
    nan = _like(1.0)
    nan["adapter_i.A.weight"][0, 0] = math.nan
    wrong = {"adapter_i.A.weight": torch.zeros(4, 4), "adapter_i.B.weight": torch.zeros(3, 2)}
    replies = [
        _reply(m[0], _like(5.0), _like(1.0), 10, 0),
        _reply(m[1], nan, _like(1.0), 10, 1),
        _reply(m[2], wrong, _like(1.0), 10, 2),
        Message(Error(code=0, reason="client crashed"), reply_to=m[3]),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, _ = s.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["adapter_i.A.weight"], torch.full((2, 3), 5.0))
    reasons = {o.partition_id: o.rejected for o in s.last_train}
    assert reasons[0] is None
    assert "NaN" in reasons[1] and "shape" in reasons[2]
    assert "client crashed" in reasons[None]
    assert "partition 1" in caplog.text and "partition 2" in caplog.text and "node 13" in caplog.text


def test_round_with_too_few_valid_updates_keeps_previous_adapters(caplog):
    s = FedNanoStrategy(FederationConfig(strategy="fedavg", min_train_clients=2))
    m = _instructions(s, 2)
    assert not s.method.sends_fisher
    negative_n = _reply(m[1], _like(1.0), None, -3, 1)
    with caplog.at_level(logging.WARNING):
        arrays, metrics = s.aggregate_train(1, [_reply(m[0], _like(1.0), None, 10, 0), negative_n])
    assert arrays is None and metrics is None
    assert "keeping the previous global adapters" in caplog.text


def test_missing_fisher_record_is_a_malformed_reply():
    s = FedNanoStrategy(FederationConfig(strategy="fednano", min_train_clients=1))
    m = _instructions(s, 1)
    arrays, _ = s.aggregate_train(1, [_reply(m[0], _like(1.0), None, 10, 0)])
    assert arrays is None
    assert "malformed reply" in s.last_train[0].rejected


def test_sampling_is_seeded_and_explicit():
    s = FedNanoStrategy(FederationConfig(fraction_train=0.5, seed=3))
    def pick(r):
        return sorted(x.metadata.dst_node_id for x in s.configure_train(r, ArrayRecord(GLOBAL), ConfigRecord({}), _Nodes(list(range(10)))))
    assert pick(1) == pick(1) and len(pick(1)) == 5
    assert any(pick(1) != pick(r) for r in range(2, 6))


def test_evaluation_sampling_is_seeded_and_every_node_by_default():
    def pick(cfg, r):
        s = FedNanoStrategy(cfg)
        msgs = s.configure_evaluate(r, ArrayRecord(GLOBAL), ConfigRecord({}), _Nodes(list(range(10))))
        return sorted(x.metadata.dst_node_id for x in msgs)
    assert pick(FederationConfig(), 1) == list(range(10))
    few = FederationConfig(fraction_evaluate=0.3, seed=3)
    assert pick(few, 2) == pick(few, 2) and len(pick(few, 2)) == 3 and set(pick(few, 2)) <= set(range(10))
    assert any(pick(few, 1) != pick(few, r) for r in range(2, 6))  # a fresh sample each round
    assert len(pick(FederationConfig(fraction_evaluate=0.01), 1)) == 1  # at least one node


def test_oversized_update_is_rejected_with_its_norm(caplog):
    s = FedNanoStrategy(FederationConfig(strategy="fedavg", min_train_clients=1, max_update_norm=1.0))
    m = _instructions(s, 2)
    with caplog.at_level(logging.WARNING):
        arrays, _ = s.aggregate_train(1, [_reply(m[0], _like(0.01), None, 10, 0), _reply(m[1], _like(100.0), None, 10, 1)])
    assert torch.allclose(arrays.to_torch_state_dict()["adapter_i.A.weight"], torch.full((2, 3), 0.01))
    assert "exceeds federation.max_update_norm=1" in s.last_train[1].rejected
    assert "partition 1" in caplog.text and "max_update_norm" in caplog.text


def test_local_clients_keep_their_own_adapters_and_nothing_is_merged():
    s = FedNanoStrategy(FederationConfig(strategy="local", min_train_clients=2))
    s.node_partition = {10: 0, 11: 1}
    m = _instructions(s, 2)  # round 1: both start from the global init
    arrays, metrics = s.aggregate_train(1, [_reply(m[0], _like(1.0), None, 10, 0)])  # one reply is enough: nothing to merge
    assert arrays is None and metrics[keys.NUM_EXAMPLES] == 10
    assert set(s.memory.clients) == {0}
    m = list(s.configure_train(2, ArrayRecord(GLOBAL), ConfigRecord({}), _Nodes([10, 11])))
    sent = {x.metadata.dst_node_id: x.content[keys.ARRAYS].to_torch_state_dict()["adapter_i.A.weight"] for x in m}
    assert torch.equal(sent[10], torch.ones(2, 3)) and torch.equal(sent[11], torch.zeros(2, 3))  # its own / still the init
    # the update bound is measured from what that client was sent, and the state survives a restart
    restored = FedNanoStrategy(FederationConfig(strategy="local"))
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.memory.clients[0]["adapter_i.A.weight"], torch.ones(2, 3))


def test_centralized_trains_one_client():
    s = FedNanoStrategy(FederationConfig(strategy="centralized", min_train_clients=2))
    m = _instructions(s, 3)
    assert [x.metadata.dst_node_id for x in m] == [10]
    arrays, _ = s.aggregate_train(1, [_reply(m[0], _like(2.0), None, 10, 0)])
    assert torch.equal(arrays.to_torch_state_dict()["adapter_i.A.weight"], torch.full((2, 3), 2.0))


def test_fedadam_steps_from_the_merged_update_and_checkpoints_its_moments():
    cfg = FederationConfig(strategy="fedadam", min_train_clients=1, server_lr=0.01)
    s = FedNanoStrategy(cfg)
    m = _instructions(s, 2)
    arrays, _ = s.aggregate_train(1, [_reply(m[0], _like(0.1), None, 10, 0), _reply(m[1], _like(0.1), None, 10, 1)])
    # delta = 0.1 everywhere: first Adam step moves each entry by 0.01 * 0.01 / (0.01 + 0.001)
    assert torch.allclose(arrays.to_torch_state_dict()["adapter_i.A.weight"], torch.full((2, 3), 0.01 * 0.01 / 0.011))
    state = s.state_dict()
    assert int(state["opt.step"]) == 1 and torch.allclose(state["opt.m.adapter_i.A.weight"], torch.full((2, 3), 0.01))
    restored = FedNanoStrategy(cfg)
    restored.load_state_dict(state)
    assert set(restored.memory.opt) == set(s.memory.opt)


def test_a_server_without_test_data_reports_the_clients_scores_weighted_by_their_questions(caplog):
    """data.server_test = false: the global accuracy is the clients' evaluations merged, each weighted by its
    number of questions, overall and per category (hand-computed); a failed evaluation does not count."""
    from fednano.federation.server_app import clients_report
    from fednano.federation.strategy import ClientOutcome

    a = ClientOutcome(1, 0, {keys.ACCURACY: 0.5, keys.NUM_EXAMPLES: 4.0, "acc/subject=NAT": 0.5, "n/subject=NAT": 2.0})
    b = ClientOutcome(2, 1, {keys.ACCURACY: 1.0, keys.NUM_EXAMPLES: 2.0, "acc/subject=NAT": 1.0, "n/subject=NAT": 1.0,
                             "acc/subject=SOC": 1.0, "n/subject=SOC": 1.0})
    failed = ClientOutcome(3, 2, {}, rejected="ClientApp raised: DataError")
    rep = clients_report([a, b, failed], 3)
    assert rep["accuracy"] == pytest.approx((0.5 * 4 + 1.0 * 2) / 6)
    assert rep["num_examples"] == 6
    assert rep["acc/subject=NAT"] == pytest.approx((0.5 * 2 + 1.0 * 1) / 3) and rep["acc/subject=SOC"] == 1.0
    with caplog.at_level(logging.WARNING):
        assert math.isnan(clients_report([failed], 4)["accuracy"])
    assert "round 4: no client evaluation came back" in caplog.text

"""Choosing rounds on a validation set: which round scores what, the best round's checkpoint, and its test
scores taken with that round's state."""

import json

import pytest
import torch

pytest.importorskip("flwr", reason="the federation layer needs Flower (absent on the GPU machine: benchmarks/gpu_checks.py)")

from fednano.config import load_config
from fednano.experiments.results import RoundRecord, RunRecorder, round_table
from fednano.federation.server_app import EvaluatePhase, Schedule, ServerRun, schedule
from fednano.federation.strategy import ClientOutcome, FedNanoStrategy
from tests.conftest import TINY


def _cfg(**sets):
    return load_config(TINY, {f"federation.{k}" if k != "validation_samples" else "data.validation_samples": v for k, v in sets.items()})


def test_without_a_validation_set_every_round_is_tested():
    cfg = _cfg(rounds=5, eval_every=2)
    assert all(schedule(r, cfg) == Schedule(validate=False, test=True, clients=True) for r in range(1, 6))


def test_with_a_validation_set_the_test_sets_wait_for_the_last_round():
    cfg = _cfg(rounds=7, eval_every=3, validation_samples=20)
    got = [(r, schedule(r, cfg)) for r in range(1, 8)]
    assert [r for r, s in got if s.validate] == [3, 6, 7]
    assert [r for r, s in got if s.test] == [7] and [r for r, s in got if s.clients] == [7]
    asked = _cfg(rounds=7, eval_every=3, validation_samples=20, client_eval_every_round=True)
    assert [r for r in range(1, 8) if schedule(r, asked).clients] == [3, 6, 7]


def _record(rnd, validation, test=None):
    return RoundRecord(round=rnd, global_accuracy=test, global_accuracy_by_category={}, client_accuracy={} if test is None else {"0": 0.5},
                       client_accuracy_by_category={}, train_loss=1.0, client_train_loss={}, train_examples=8, aggregated=True,
                       clients_sampled=1, clients_accepted=1, rejected=[], dropped=[], bytes={"adapters_up": 4}, split_steps=1,
                       server_llm_seconds=0.0, client_seconds={}, phase_seconds={}, seconds=1.0, memory={}, validation_accuracy=validation)


def _state(v):
    return {"w": torch.full((2,), float(v))}


def test_the_best_round_is_checkpointed_with_the_rounds_and_survives_a_resume(tmp_path):
    cfg = _cfg(rounds=3, validation_samples=20)
    rec = RunRecorder(tmp_path, cfg)
    rec.complete_round(_record(1, 0.4), _state(1), {"m": torch.ones(1)}, best=True)
    rec.complete_round(_record(2, 0.6), _state(2), {"m": torch.full((1,), 2.0)}, best=True)
    rec.complete_round(_record(3, 0.5, test=0.55), _state(3), {}, best=False)
    ckpt = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    # the last round's checkpoint (to resume) and the best round's (to score at the end); round 1's are gone
    assert ckpt == ["adapters-round-3.safetensors", "best-adapters-round-2.safetensors", "best-strategy-round-2.safetensors",
                    "strategy-round-3.safetensors"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best_validation"]["round"] == 2 and saved["best_validation"]["validation_accuracy"] == 0.6
    assert saved["rounds"][0]["global_accuracy"] is None and saved["rounds"][2]["global_accuracy"] == 0.55  # kept as null
    again = RunRecorder(tmp_path, cfg, resume=True)
    adapters, strategy = again.best_state()
    assert torch.equal(adapters["w"], _state(2)["w"]) and torch.equal(strategy["m"], torch.full((1,), 2.0))
    table = round_table(saved | {"zero_shot_accuracy": 0.3, "zero_shot_validation_accuracy": 0.31})
    assert "validation acc." in table and "| 0 (zero-shot) | 0.3000 | 0.3100 |" in table and "| 2 |  | 0.6000 |" in table


def test_the_best_round_is_scored_with_its_own_state_and_the_last_state_comes_back(tmp_path):
    cfg = _cfg(rounds=3, validation_samples=20)
    run = ServerRun.__new__(ServerRun)  # the phases under test only: no LLM, no grid
    run.cfg, run.recorder, run.strategy = cfg, RunRecorder(tmp_path, cfg), FedNanoStrategy(cfg.federation)
    run.recorder.complete_round(_record(1, 0.7), _state(1), {}, best=True)
    run.recorder.complete_round(_record(2, 0.5, test=0.2), _state(2), {}, best=False)
    run.global_state = _state(2)
    seen = []

    def evaluate(rnd, when):  # scores a state by its value, as the clients and the server would score it
        seen.append((rnd, when, float(run.global_state["w"][0])))
        run.strategy.last_evaluate = [ClientOutcome(1, 0, metrics={"accuracy": 0.1 * float(run.global_state["w"][0])})]
        return EvaluatePhase([], {"accuracy": float(run.global_state["w"][0]) / 10}, {})

    run.evaluate = evaluate
    best = run.best_round()
    assert seen == [(1, Schedule(validate=False, test=True, clients=True), 1.0)]  # round 1's state, test sets and clients
    assert best["round"] == 1 and best["validation_accuracy"] == 0.7
    assert best["global_accuracy"] == pytest.approx(0.1) and best["client_accuracy"] == {"0": pytest.approx(0.1)}
    assert float(run.global_state["w"][0]) == 2.0  # the last round's state is back

    run.recorder.complete_round(_record(3, 0.9, test=0.8), _state(3), {}, best=True)  # the last round is the best: nothing re-scored
    seen.clear()
    assert run.best_round()["global_accuracy"] == 0.8 and seen == []

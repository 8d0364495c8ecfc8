"""Issue #37's protocol script (benchmarks/merge_protocol.py): the screening rule, the files it writes, the verdict."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fednano.experiments.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("merge_protocol", ROOT / "benchmarks" / "merge_protocol.py")
assert SPEC is not None and SPEC.loader is not None
mp = importlib.util.module_from_spec(SPEC)
sys.modules["merge_protocol"] = mp  # (dataclasses look their module up)
SPEC.loader.exec_module(mp)


def rounds(val: dict[int, float], n: int = 16, moved: int = 100) -> list[dict]:
    return [{"round": k, "bytes": {"adapters_up": moved, "activations_up": moved}, **({"validation_accuracy": val[k]} if k in val else {})}
            for k in range(1, n + 1)]


def write_run(folder: Path, val: dict[int, float], n: int = 16, moved: int = 100, final: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"config": {}, "rounds": rounds(val, n, moved), "final": final if final is not None else {"global_accuracy": 0.5}}
    (folder / "results.json").write_text(json.dumps(data))


def test_run_score_reads_the_fixed_rounds_and_names_a_missing_one():
    results = {"rounds": rounds({12: 0.7, 14: 0.8, 16: 0.6, 10: 0.99})}
    assert mp.run_score(results) == [0.7, 0.8, 0.6]  # round 10 plays no part
    with pytest.raises(mp.ProtocolError, match="run.json: no validation accuracy at round 14"):
        mp.run_score({"rounds": rounds({12: 0.7, 16: 0.6})}, where="run.json")


def test_bytes_through_counts_every_kind_up_to_the_round():
    results = {"rounds": rounds({}, n=24, moved=5)}
    assert mp.bytes_through(results, 16) == 16 * 2 * 5


def test_choose_takes_the_highest_and_a_tie_within_half_a_point_goes_to_fewer_bytes():
    moved = {"a": 300.0, "b": 100.0, "c": 50.0}
    assert mp.choose({"a": 0.760, "b": 0.700, "c": 0.650}, moved) == "a"
    assert mp.choose({"a": 0.760, "b": 0.756, "c": 0.650}, moved) == "b"  # 0.4 points: a tie, b moves less
    assert mp.choose({"a": 0.760, "b": 0.755, "c": 0.754}, moved) == "b"  # exactly 0.5 points is a tie; 0.6 is not
    with pytest.raises(mp.ProtocolError):
        mp.choose({}, {})


def test_fall_back_is_the_drop_after_the_first_best():
    assert mp.fall_back([None, 0.4, 0.7, 0.5, 0.65]) == pytest.approx(0.2)
    assert mp.fall_back([0.4, 0.5, 0.6]) == 0.0
    assert mp.fall_back([0.7, 0.7, 0.6]) == pytest.approx(0.1)  # from the first of two equal bests
    assert mp.fall_back([None, None]) is None


SWEEP = """
[sweep]
base_config = "{base}"
output = "results/merge"
archive = "arch/merge"
[sweep.set]
"federation.rounds" = 24
"train.fisher_samples" = 16
"data.validation_samples" = 20
"""
SCREENS = {"screen-normalized": '"federation.fisher_normalize" = true', "screen-64": '"train.fisher_samples" = 64'}
SWEEP += "".join(f'[[grid]]\nvariant = "{name}"\nmethods = ["fednano"]\nalphas = [0.1]\nnum_clients = [5]\nseeds = [0]\n'
                 f'[grid.set]\n"federation.rounds" = 16\n{setting}\n' for name, setting in SCREENS.items())


def screening(tmp_path: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[Path, list]:
    sweep = tmp_path / "merge.toml"
    sweep.write_text(SWEEP.format(base=(ROOT / "configs" / "default.toml").as_posix()))
    vals = {"screen-normalized": (0.70, 0.60, 0.50), "screen-64": (0.72, 0.62, 0.52)}  # 64 samples: 2 points higher
    moved = {"screen-normalized": 100, "screen-64": 300}
    for name, accs in vals.items():
        for seed in seeds:
            a = accs[seed]
            folder = tmp_path / "arch" / "merge" / name / "fednano" / f"a0.1-c5-s{seed}"
            write_run(folder, {12: a - 0.1, 14: a, 16: a + 0.1}, moved=moved[name])
    for seed in (0, 1, 2):  # the reference, 24 rounds from the convergence archive: only 12, 14, 16 count
        folder = tmp_path / "benchmarks" / "runs" / "convergence" / "fednano-ffa" / f"a0.1-c5-s{seed}"
        write_run(folder, {12: 0.5, 14: 0.5, 16: 0.5, 24: 0.9}, n=24, moved=10)
    return sweep, [mp.score(c) for c in mp.candidates(sweep, root=tmp_path)]


def test_screening_scores_each_candidate_by_hand_computed_values(tmp_path):
    _, scored = screening(tmp_path)
    by = {s.candidate.name: s for s in scored}
    assert list(by) == ["screen-normalized", "screen-64", "fednano-ffa"]
    assert by["screen-normalized"].score == pytest.approx(0.60)  # mean over seeds of (a-0.1, a, a+0.1) = a
    assert by["screen-64"].score == pytest.approx(0.62)
    assert by["fednano-ffa"].score == pytest.approx(0.50)  # round 24's 0.9 is not read
    assert by["screen-64"].bytes == 16 * 2 * 300
    assert by["screen-64"].candidate.settings == {"train.fisher_samples": 64}  # federation.rounds is the screen's, not a setting
    png = tmp_path / "screening.png"
    assert mp.plot_screening([s.candidate for s in scored], png, root=tmp_path) == 9 and png.stat().st_size > 0  # no references here
    table = mp.screening_table(scored)
    assert "| screen-64 | train.fisher_samples = 64 | 72.0 | 62.0 | 52.0 | 62.0 |" in table


def test_a_missing_seed_is_named_and_leaves_no_score(tmp_path):
    _, scored = screening(tmp_path, seeds=(0, 1))
    s = scored[0]
    assert s.score is None and len(s.missing) == 1 and "screen-normalized/fednano/a0.1-c5-s2/results.json: not there" in s.missing[0]
    assert "(incomplete)" in mp.screening_table(scored)


def test_the_written_sweep_files_plan_the_protocols_runs(tmp_path):
    sweep, scored = screening(tmp_path)
    chosen = next(s.candidate for s in scored if s.candidate.name == "screen-64")
    confirm, default = mp.confirm_files(chosen, scored, sweep)
    (tmp_path / "configs" / "sweeps").mkdir(parents=True)
    paths = []
    for name, text in (("merge-confirm.toml", confirm), ("merge-default.toml", default)):
        p = tmp_path / "configs" / "sweeps" / name
        p.write_text(text.replace('"../default.toml"', json.dumps((ROOT / "configs" / "default.toml").as_posix())))
        paths.append(p)
    c = load_sweep(paths[0])
    runs = [(p.variant, p.method, p.seed) for p in c.points]
    assert runs[:4] == [("confirm-64", "fednano", 5), ("confirm-fedavg", "fedavg", 5),
                        ("confirm-64", "fednano", 6), ("confirm-fedavg", "fedavg", 6)]
    assert len(runs) == 10 + 3 * 5  # then centralized, the paper's fednano and fednano-ffa at seeds 5-9
    first = c.points[0].cfg
    assert first.train.fisher_samples == 64 and first.federation.rounds == 24 and first.data.validation_samples == 20
    assert c.points[1].cfg.train.fisher_samples == 16  # fedavg keeps the sweep's setting
    assert {p.seed for p in c.points} == {5, 6, 7, 8, 9}
    d = load_sweep(paths[1])
    assert sorted((p.method, p.alpha, p.seed) for p in d.points) == [(m, 1.0, s) for m in ("fedavg", "fednano") for s in (0, 1, 2)]
    assert "| screen-64 |" in confirm  # the screening it was chosen on, in its header


def test_the_reference_as_the_candidate_is_confirmed_once(tmp_path):
    sweep, scored = screening(tmp_path)
    ffa = next(s.candidate for s in scored if s.candidate.name == "fednano-ffa")
    confirm = mp.confirm_files(ffa, scored, sweep)[0]
    assert confirm.count('variant = "confirm-fednano-ffa"') == 5 and 'variant = "confirm-fednano"\n' in confirm
    (tmp_path / "c.toml").write_text(confirm)
    assert "Confirmation of confirm-fednano-ffa against fedavg" in mp.confirmation(tmp_path / "none", tmp_path / "c.toml")


def written(tmp_path: Path) -> tuple[Path, Path]:
    """merge-confirm.toml and merge-default.toml as the protocol writes them for the screening's choice, screen-64."""
    sweep, scored = screening(tmp_path)
    chosen = next(s.candidate for s in scored if s.candidate.name == "screen-64")
    paths = (tmp_path / "merge-confirm.toml", tmp_path / "merge-default.toml")
    for path, text in zip(paths, mp.confirm_files(chosen, scored, sweep), strict=True):
        path.write_text(text)
    return paths


def test_confirmation_decides_by_the_verdict_rule(tmp_path):
    confirm_file = written(tmp_path)[0]
    arch = tmp_path / "confirm"
    diffs = {5: 0.03, 6: 0.05, 7: 0.04, 8: 0.06, 9: 0.02}  # candidate − fedavg: mean +4, sd 1.58 -> [+2.0, +6.0]
    for seed, d in diffs.items():
        write_run(arch / "confirm-64" / "fednano" / f"a0.1-c5-s{seed}", {2: 0.5, 4: 0.8, 6: 0.7}, n=6,
                  final={"global_accuracy": 0.6 + d, "best_validation": {"global_accuracy": 0.6 + d}})
        write_run(arch / "confirm-fedavg" / "fedavg" / f"a0.1-c5-s{seed}", {2: 0.5, 4: 0.6}, n=6,
                  final={"global_accuracy": 0.6, "best_validation": {"global_accuracy": 0.6}})
        write_run(arch / "confirm-centralized" / "centralized" / f"a0.1-c5-s{seed}", {}, n=6,
                  final={"global_accuracy": 0.68, "best_validation": {"global_accuracy": 0.68}})
    out = mp.confirmation(arch, confirm_file)
    assert "+4.0 [+2.0, +6.0] (5/5) | **holds** | yes | 50 %" in out  # 4 of fedavg's 8 points to centralized
    assert "| confirm-64 | 10.0 | 10.0 | 10.0 | 10.0 | 10.0 |" in out  # 0.8 at round 4, then 0.7
    assert "confirm-fednano/fednano/a0.1-c5-s5/results.json: not there" in out  # not run yet: said, not guessed


def test_confirmation_reports_the_papers_fednano_beside_the_verdict(tmp_path):
    confirm_file = written(tmp_path)[0]
    arch = tmp_path / "confirm"
    diffs = {5: 0.03, 6: 0.05, 7: 0.04, 8: 0.06, 9: 0.02}  # candidate − fedavg, as above
    behind = {5: 0.04, 6: 0.06, 7: 0.05, 8: 0.07, 9: 0.03}  # fedavg − fednano: mean 5, sd 1.58 -> [−7.0, −3.0]
    for seed in diffs:  # candidate − fednano = 7, 11, 9, 13, 5: mean 9, sd 3.16 -> ±2.776·3.16/√5 = ±3.9
        for v, m, acc in (("confirm-64", "fednano", 0.6 + diffs[seed]), ("confirm-fedavg", "fedavg", 0.6),
                          ("confirm-fednano", "fednano", 0.6 - behind[seed])):
            write_run(arch / v / m / f"a0.1-c5-s{seed}", {2: 0.5}, n=6,
                      final={"global_accuracy": acc, "best_validation": {"global_accuracy": acc}})
    out = mp.confirmation(arch, confirm_file)
    assert "+4.0 [+2.0, +6.0] (5/5) | **holds**" in out  # the verdict is the candidate's against fedavg, as before
    assert "| confirm-fednano − confirm-fedavg | at round 24 | -5.0 [-7.0, -3.0] (0/5) |" in out
    assert "| confirm-64 − confirm-fednano | at the best validation round | +9.0 [+5.1, +12.9] (5/5) |" in out
    assert "confirm-fednano-ffa/fednano-ffa/a0.1-c5-s5/results.json: not there" in out  # still not run: said


def test_the_default_setting_is_decided_on_the_final_global_accuracy(tmp_path):
    default_file = written(tmp_path)[1]
    arch = tmp_path / "default"
    diffs = {0: 0.01, 1: 0.02, 2: 0.03}  # mean +2, sd 1: ±4.303/√3 = ±2.48 -> [−0.5, +4.5]: holds (> −2), not > 0
    for seed, d in diffs.items():
        write_run(arch / "default-64" / "fednano" / f"a1.0-c5-s{seed}", {}, n=3,
                  final={"global_accuracy": 0.6 + d, "client_accuracy": {"0": 0.5, "1": 0.7 + 2 * d}})
        write_run(arch / "default-fedavg" / "fedavg" / f"a1.0-c5-s{seed}", {}, n=3,
                  final={"global_accuracy": 0.6, "client_accuracy": {"0": 0.5, "1": 0.7}})
    out = mp.default_setting(arch, default_file)
    assert "| global test, after the last round | +2.0 [-0.5, +4.5] (3/3) | **holds** | no |" in out
    assert "| the clients' own test splits | +2.0 [-0.5, +4.5] (3/3) | (not decided on) | no |" in out  # (0.5 + 0.7 + 2d)/2 − 0.6 = d
    (arch / "default-fedavg" / "fedavg" / "a1.0-c5-s2" / "results.json").unlink()
    out = mp.default_setting(arch, default_file)
    assert "(2/2)" in out and "default-fedavg/fedavg/a1.0-c5-s2/results.json: not there" in out


def test_stability_reports_fall_back_and_swings_beside_the_validation_noise(tmp_path):
    assert mp.largest_swing([None, 0.5, 0.7, None, 0.4, 0.45]) == pytest.approx(0.3)  # 0.7 -> 0.4, across the unvalidated round
    assert mp.largest_swing([0.5, None]) is None
    assert mp.validation_error(0.8, 100) == pytest.approx(0.04)  # sqrt(0.8 * 0.2 / 100)
    arch = tmp_path / "convergence"  # <archive>/<method>/<run>, as the convergence archive is laid out
    for seed, curve in ((0, {2: 0.5, 4: 0.8, 6: 0.6}), (1, {2: 0.6, 4: 0.7, 6: 0.7})):
        write_run(arch / "fedavg" / f"a0.1-c5-s{seed}", curve, n=6)
    write_run(arch / "fedavg" / "a0.1-c5-s2", {2: 0.1, 4: 0.9}, n=6, final={})  # unfinished: left out
    for path in arch.rglob("results.json"):
        r = json.loads(path.read_text())
        r["config"] = {"data": {"validation_samples": 100}}
        path.write_text(json.dumps(r))
    out = mp.stability([arch])
    # fall-back 20 and 0 (mean 10); swings 30 (0.5 -> 0.8) and 10; errors sqrt(.8*.2/100) = 4.0 and sqrt(.7*.3/100) = 4.58
    assert "| convergence: fedavg | 2 | 20.0, 0.0 | 10.0 | 30.0, 10.0 | 4.3 |" in out

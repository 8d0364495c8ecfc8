"""`fednano sweep` and `fednano report`: pure pieces on synthetic results, then a real micro-sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fednano.cli import app
from fednano.config import ConfigError, load_config
from fednano.experiments import convergence as cv
from fednano.experiments import publish
from fednano.experiments import report as rp
from fednano.experiments import sweep as sw

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


# --------------------------------------------------------------------------- synthetic results


def fake_results(
    method: str,
    alpha: float,
    clients: int,
    seed: int,
    accs: list[float],
    client_acc: dict | None = None,
    final: bool = True,
    extra_round: dict | None = None,
    extra_final: dict | None = None,
) -> dict:
    """A results.json dict: `accs` = [zero-shot, round 1, ...] global accuracy."""
    cfg = load_config(
        None,
        {
            "federation.strategy": method,
            "data.dirichlet_alpha": alpha,
            "data.num_clients": clients,
            "data.seed": seed,
            "federation.seed": seed,
        },
    ).to_dict()
    rounds = []
    for i, a in enumerate(accs[1:], 1):
        r = {
            "round": i,
            "global_accuracy": a,
            "client_accuracy": client_acc or {},
            "train_loss": 1.0 / i,
            "bytes": {
                "adapters_down": 2**20,
                "adapters_up": 2**19,
                "fisher_up": 2**19,
                "activations_up": 3 * 2**20,
                "gradients_down": 3 * 2**20,
                "eval_activations_up": 0,
                "eval_scores_down": 0,
            },
            "seconds": 10.0 * i,
        }
        r.update(extra_round or {})
        rounds.append(r)
    fin = {
        "global_accuracy": accs[-1],
        "zero_shot_accuracy": accs[0],
        "client_accuracy": client_acc or {},
        "bytes_total": 0,
        "adapter_parameters": 100,
        "seconds": 1.0,
    }
    fin.update(extra_final or {})
    return {"config": cfg, "zero_shot_accuracy": accs[0], "rounds": rounds, "final": fin if final else {}}


def write_run(root: Path, res: dict) -> Path:
    c = res["config"]
    d = root / c["federation"]["strategy"] / sw.run_dir_name(c["data"]["dirichlet_alpha"], c["data"]["num_clients"], c["data"]["seed"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_mean_std_and_cell_format() -> None:
    m, s = rp.mean_std([0.5, 0.7])
    assert m == pytest.approx(0.6)
    assert s == pytest.approx(0.141421356, rel=1e-6)  # sample std, ddof=1
    assert rp.format_cell(m, s) == "60.0 ± 14.1"
    assert rp.format_cell(m, s, bold=True) == "**60.0 ± 14.1**"
    assert rp.format_cell(m, s, n=2) == "60.0 ± 14.1 (n=2)"
    assert rp.mean_std([0.42]) == (pytest.approx(0.42), None)
    assert rp.format_cell(*rp.mean_std([0.42])) == "42.0"
    assert rp.mean_std([]) == (None, None)
    assert rp.format_cell(None, None) == "—"
    assert rp.best_keys({"a": 0.5, "b": 0.61, "c": 0.6099, "d": None}) == {"b", "c"}  # ties as displayed (61.0)


def test_tables_from_synthetic_runs(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    ca = {"0": 0.4, "1": 0.6}
    write_run(root, fake_results("fednano", 0.1, 5, 0, [0.3, 0.45, 0.5], client_acc=ca))
    write_run(root, fake_results("fednano", 0.1, 5, 1, [0.3, 0.6, 0.7], client_acc={"0": 0.8, "1": 0.6}))
    write_run(root, fake_results("fedavg", 0.1, 5, 0, [0.3, 0.4, 0.4], client_acc=ca))
    write_run(root, fake_results("fedavg", 0.1, 5, 1, [0.3, 0.5, 0.6], client_acc=ca))
    write_run(root, fake_results("fednano", 1.0, 5, 0, [0.3, 0.5, 0.55]))
    write_run(root, fake_results("fedavg", 1.0, 5, 0, [0.3, 0.6, 0.65]))
    write_run(root, fake_results("fedavg", 1.0, 5, 1, [0.3, 0.6, 0.75]))
    unfinished = write_run(root, fake_results("fedprox", 1.0, 5, 0, [0.3, 0.5], final=False))

    finished, unfin, problems = rp.load_runs([root])
    assert len(finished) == 7 and [r.path for r in unfin] == [unfinished] and problems == []
    cells = rp.summarize(finished)
    assert [(c.method, c.alpha, c.n) for c in cells] == [("fednano", 0.1, 2), ("fedavg", 0.1, 2), ("fednano", 1.0, 1), ("fedavg", 1.0, 2)]

    table = rp.accuracy_table(cells, "global")
    lines = table.splitlines()
    assert lines[0] == "| method | α=0.1 (5 clients) | α=1 (5 clients) |"
    # seed counts differ between cells -> every cell shows n; best mean per column in bold
    assert lines[2] == "| fednano | **60.0 ± 14.1** (n=2) | 55.0 (n=1) |"
    assert lines[3] == "| fedavg | 50.0 ± 14.1 (n=2) | **70.0 ± 7.1** (n=2) |"

    local = rp.accuracy_table(cells, "local").splitlines()
    # fednano α=0.1: per-seed means over clients 0.5 and 0.7 -> 60.0 ± 14.1; fedavg: 0.5, 0.5
    assert local[2] == "| fednano | **60.0 ± 14.1** | — |"
    assert local[3] == "| fedavg | 50.0 ± 0.0 | — |"

    rows = list(csv.DictReader(io.StringIO(rp.table_csv(cells))))
    assert [rows[0][k] for k in ("method", "alpha", "clients", "seeds")] == ["fednano", "0.1", "5", "2"]
    assert [float(rows[0][k]) for k in ("global_mean", "global_std", "local_mean", "local_std")] == pytest.approx(
        [0.6, 0.1414213562, 0.6, 0.1414213562]
    )
    assert [float(rows[1][k]) for k in ("global_mean", "global_std", "local_mean", "local_std")] == pytest.approx(
        [0.5, 0.1414213562, 0.5, 0.0]
    )
    assert rows[2]["method"] == "fednano" and rows[2]["alpha"] == "1.0" and rows[2]["seeds"] == "1"
    assert float(rows[2]["global_mean"]) == pytest.approx(0.55) and rows[2]["global_std"] == "" and rows[2]["local_mean"] == ""

    # curves: round 0 = zero-shot, mean ± std over seeds
    m, s = rp.mean_std_curve([rp.accuracy_curve(r.results) for r in finished if r.method == "fedavg" and r.alpha == 1.0])
    assert m == pytest.approx([0.3, 0.6, 0.7]) and s[:2] == pytest.approx([0.0, 0.0]) and s[2] == pytest.approx(0.0707107, rel=1e-5)
    assert rp.cumulative_mib(finished[0].results) == pytest.approx([8.0, 16.0])

    # paired, seed by seed: α=0.1 fednano 0.5, 0.7 vs fedavg 0.4, 0.6 -> +10, +10 (2/2);
    # α=1: only seed 0 in both, 0.55 - 0.65 = -10 (0/1); local α=0.1: 0.5-0.5, 0.7-0.5
    p = rp.paired_difference(cells[0], cells[1])
    assert (p.mean, p.std, p.wins, p.n) == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-12), 2, 2)
    p1 = rp.paired_difference(cells[2], cells[3])
    assert (p1.mean, p1.std, p1.wins, p1.n) == (pytest.approx(-0.1), None, 0, 1)
    pl = rp.paired_difference(cells[0], cells[1], "local")
    assert (pl.mean, pl.std, pl.wins, pl.n) == (pytest.approx(0.1), pytest.approx(0.1414213562), 1, 2)
    ptab = rp.paired_table(cells, "fednano").splitlines()
    assert ptab[2] == "| fednano − fedavg | +10.0 [+10.0, +10.0] (2/2) | -10.0 (0/1) |"
    # the 95 % t-interval of the local differences 0 and +20 points: 10 ± t(0.975, 1) · 14.142 / √2 = 10 ± 12.706 · 10
    assert pl.interval == (pytest.approx(0.1 - 1.270620), pytest.approx(0.1 + 1.270620))
    assert rp.format_paired(pl) == "+10.0 [-117.1, +137.1] (1/2)" and p1.interval is None
    assert rp.paired_table(cells, "fedavg").splitlines()[2] == "| fedavg − fednano | -10.0 [-10.0, -10.0] (0/2) | +10.0 (1/1) |"
    prow = [r for r in csv.DictReader(io.StringIO(rp.paired_csv(cells, "fednano"))) if r["alpha"] == "0.1" and r["metric"] == "local"]
    assert (
        len(prow) == 1
        and prow[0]["method"] == "fedavg"
        and prow[0]["baseline_higher"] == "1"
        and float(prow[0]["std_difference"]) == pytest.approx(0.1414213562)
    )

    out = tmp_path / "rep"
    rep = publish.build_report([root], out)
    assert "| fednano − fedavg | +10.0 [+10.0, +10.0] (2/2) | -10.0 (0/1) |" in (out / "table.md").read_text()
    assert publish.build_report([root], tmp_path / "rep2", baseline="fedprox").paired_table == ""  # fedprox never finished
    for name in ("table.md", "table.csv", "paired.csv", "cost.md", "cost.csv", "curves.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 0
    assert any("unfinished" in n and str(unfinished) in n for n in rep.notes)
    assert "**60.0 ± 14.1** (n=2)" in (out / "table.md").read_text()
    # the claims whose methods both ran: fednano vs fedavg, +10 points on both seeds at α=0.1, one seed at α=1 (no best round)
    verdicts = list(csv.DictReader(io.StringIO((out / "verdicts.csv").read_text())))
    assert [(v["method"], v["other"], v["alpha"], v["metric"], v["verdict"]) for v in verdicts] == [
        ("fednano", "fedavg", "0.1", "global", "too few seeds"), ("fednano", "fedavg", "1.0", "global", "too few seeds")] * 2  # 2 seeds
    assert "+10.0 [+10.0, +10.0] (2/2)" in (out / "verdicts.md").read_text()


def test_cost_uses_new_fields_and_dashes_missing_ones(tmp_path: Path) -> None:
    new_round = {"split_steps": 4, "server_llm_seconds": 3.0, "client_seconds": {"0": 2.0, "1": 4.0}}
    new_final = {"client_parameters": 5_000_000, "uploaded_parameters_per_round": 20_000}
    old = fake_results("fedavg", 1.0, 2, 0, [0.3, 0.4, 0.5])
    new = fake_results("fednano", 1.0, 2, 0, [0.3, 0.4, 0.5], extra_round=new_round, extra_final=new_final)
    nosplit = fake_results("fedprox", 1.0, 2, 0, [0.3, 0.4, 0.5], extra_round={"split_steps": 0})
    c = rp.run_cost(new)
    assert c["activation_bytes_per_step"] == pytest.approx(3 * 2**20 / 4)
    assert c["mib_per_round"] == pytest.approx(8.0)  # 1 + 0.5 + 0.5 + 3 + 3 MiB
    assert c["server_seconds_per_round"] == pytest.approx(3.0)
    assert c["client_seconds_per_round"] == pytest.approx(3.0)
    assert c["wall_seconds_per_round"] == pytest.approx(15.0)
    assert c["client_parameters"] == 5_000_000 and c["uploaded_parameters_per_round"] == 20_000
    assert rp.run_cost(nosplit)["activation_bytes_per_step"] is None
    oc = rp.run_cost(old)
    assert oc["client_parameters"] is None and oc["server_seconds_per_round"] is None and oc["client_seconds_per_round"] is None

    runs = [rp.Run(tmp_path / str(i), r) for i, r in enumerate([new, old, nosplit])]
    rows = rp.cost_rows(runs)
    assert [r["method"] for r in rows] == ["fednano", "fedavg", "fedprox"]
    md = rp.cost_markdown(rows).splitlines()
    assert md[2] == "| fednano | 1 | 5,000,000 | 20,000 | 768.0 KiB | 8.00 | 3.00 | 3.00 | 15.0 |"
    assert md[3] == "| fedavg | 1 | — | — | — | 8.00 | — | — | 15.0 |"
    assert md[4].startswith("| fedprox | 1 | — | — | — |")
    crow = list(csv.DictReader(io.StringIO(rp.cost_csv(rows))))
    assert crow[1]["client_parameters"] == "" and float(crow[0]["activation_bytes_per_step"]) == 786432.0


def test_report_cli_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error: not a folder" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no finished runs" in r.output


# --------------------------------------------------------------------------- sweep files and planning


def sweep_file(tmp_path: Path, out: Path, grids: str, sets: str = '"federation.rounds" = 1') -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(f'[sweep]\nbase_config = "{TINY}"\noutput = "{out}"\n[sweep.set]\n{sets}\n{grids}')
    return p


GRID = '[[grid]]\nmethods = ["fednano", "fedavg"]\nalphas = [1.0]\nnum_clients = [2]\nseeds = [0, 1]\n'


def test_load_sweep_points_and_validation(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = sw.load_sweep(sweep_file(tmp_path, out, GRID + '[[grid]]\nmethods = ["fedavg"]\nalphas = [1, 0.1]\nseeds = [1]\n'))
    names = [p.name for p in s.points]
    # the second grid repeats fedavg/a1.0-c2-s1 (run once) and adds α=0.1 (num_clients from the base config: 2)
    assert names == ["fednano/a1.0-c2-s0", "fednano/a1.0-c2-s1", "fedavg/a1.0-c2-s0", "fedavg/a1.0-c2-s1", "fedavg/a0.1-c2-s1"]
    p = s.points[1]
    assert (p.cfg.federation.strategy, p.cfg.data.seed, p.cfg.federation.seed, p.cfg.federation.rounds) == ("fednano", 1, 1, 1)
    assert p.cfg.train.local_steps == load_config(TINY).train.local_steps and p.run_dir == out / "fednano" / "a1.0-c2-s1"

    bad = sweep_file(tmp_path, out, '[[grid]]\nmethods = ["fednano", "nosuchmethod"]\nalphas = [1.0]\nseeds = [0]\n')
    with pytest.raises(
        ConfigError,
        match=r"sweep\.toml: grid #1, point \(method='nosuchmethod', alpha=1.0, num_clients=2, seed=0\): "
        r".*federation\.strategy",
    ):
        sw.load_sweep(bad)
    bad = sweep_file(tmp_path, out, "[[grid]]\nalphas = [1.0, -1.0]\n")
    with pytest.raises(ConfigError, match=r"grid #1, point \(method='fednano', alpha=-1.0.*data\.dirichlet_alpha"):
        sw.load_sweep(bad)
    with pytest.raises(ConfigError, match=r"sweep\.toml: base config with \[sweep.set\].*train\.nope"):
        sw.load_sweep(sweep_file(tmp_path, out, GRID, sets='"train.nope" = 1'))
    with pytest.raises(ConfigError, match=r"grid #1: unknown key"):
        sw.load_sweep(sweep_file(tmp_path, out, '[[grid]]\nmethod = ["fednano"]\n'))
    with pytest.raises(ConfigError, match=r"at least one \[\[grid\]\]"):
        sw.load_sweep(sweep_file(tmp_path, out, ""))
    # the CLI names the sweep file and the point, exits 2, runs nothing
    bad = sweep_file(tmp_path, out, "[[grid]]\nalphas = [1.0, -1.0]\n")
    r = CliRunner().invoke(app, ["sweep", "--config", str(bad), "--dry-run"])
    assert r.exit_code == 2 and "error:" in r.output and "alpha=-1.0" in r.output and not out.exists()


VARIANTS = (
    '[[grid]]\nmethods = ["fednano"]\nseeds = [0]\n'
    '[[grid]]\nvariant = "noise-5"\nmethods = ["fednano"]\nseeds = [0]\n'
    '[grid.set]\n"split.protocol" = "activations"\n"privacy.embedding_noise" = 5.0\n'
    '[[grid]]\nvariant = "noise-5"\nmethods = ["fednano"]\nseeds = [1]\n'
    '[grid.set]\n"split.protocol" = "activations"\n"privacy.embedding_noise" = 5.0\n'
)


def test_a_sweep_grid_may_be_a_named_variant_with_settings_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = sw.load_sweep(sweep_file(tmp_path, out, VARIANTS))
    assert [p.name for p in s.points] == ["fednano/a1.0-c2-s0", "noise-5/fednano/a1.0-c2-s0", "noise-5/fednano/a1.0-c2-s1"]
    plain, noisy, _ = s.points
    assert plain.run_dir == out / "fednano" / "a1.0-c2-s0" and noisy.run_dir == out / "noise-5" / "fednano" / "a1.0-c2-s0"
    assert (plain.cfg.privacy.embedding_noise, plain.cfg.split.protocol) == (0.0, load_config(TINY).split.protocol)
    assert (noisy.cfg.privacy.embedding_noise, noisy.cfg.split.protocol, noisy.cfg.federation.rounds) == (5.0, "activations", 1)
    arch = sw.Sweep(s.source, None, out, {}, archive=tmp_path / "arch")
    assert sw.archived(arch, noisy) == tmp_path / "arch" / "noise-5" / "fednano" / "a1.0-c2-s0"

    def refused(grids: str, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            sw.load_sweep(sweep_file(tmp_path, out, grids))

    refused('[[grid]]\n[grid.set]\n"train.local_steps" = 3\n', r"grid #1: a grid with its own `set` needs a `variant`")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"data.seed" = 3\n', r"grid #1: set key 'data.seed' is a grid axis; use the grid's seeds")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"data.num_clients" = 3\n', r"grid's num_clients list")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"federation.strategy" = "fedavg"\n', r"grid's methods list")
    refused('[[grid]]\nvariant = "../up"\n', r"grid #1: variant must be a folder name")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"train.nope" = 3\n',
            r"grid #1: base config with \[sweep.set\] and the grid's set.*train\.nope")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"privacy.embedding_noise" = 5.0\n', r"grid #1.*privacy\.embedding_noise")
    refused('[[grid]]\nvariant = "x"\n[grid.set]\n"train.local_steps" = 3\n[[grid]]\nvariant = "x"\n[grid.set]\n"train.local_steps" = 4\n',
            r"grid #2: variant 'x' is set differently by an earlier grid")


def test_dry_run_plans_skip_resume_and_refuses_a_changed_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = sweep_file(tmp_path, out, GRID)
    points = {p.name: p for p in sw.load_sweep(path).points}
    finished = points["fednano/a1.0-c2-s0"]
    interrupted = points["fedavg/a1.0-c2-s1"]
    for p, final in ((finished, {"global_accuracy": 0.5}), (interrupted, {})):
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "results.json").write_text(
            json.dumps({"config": p.cfg.to_dict(), "rounds": [{"round": 1, "global_accuracy": 0.4}], "final": final})
        )

    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if line.startswith("  ") and "/" in line.split()[1]}
    assert lines["fednano/a1.0-c2-s0"].split()[0] == "skip"
    assert lines["fedavg/a1.0-c2-s1"].split()[0] == "resume" and f"run --resume {interrupted.run_dir}" in lines["fedavg/a1.0-c2-s1"]
    assert lines["fednano/a1.0-c2-s1"].split()[0] == "run" and "--output" in lines["fednano/a1.0-c2-s1"]
    assert "1 to resume, 2 to run, 1 to skip" in r.output
    assert not (out / "sweep.json").exists()  # a dry run writes nothing

    # the sweep now asks for another config: refuse, naming the folder and the field
    path = sweep_file(tmp_path, out, GRID, sets='"federation.rounds" = 1\n"train.local_steps" = 7')
    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--dry-run"])
    assert r.exit_code == 2 and "error:" in r.output
    assert str(finished.run_dir) in r.output and "train.local_steps" in r.output


def test_failed_runs_do_not_stop_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process pool with fake runs: one fails, the others finish; exit 1 naming the failure's run.log."""
    out = tmp_path / "out"
    path = sweep_file(tmp_path, out, GRID)
    script = (
        "import json, os, sys, time; d = sys.argv[1]; time.sleep(0.3)\n"
        "assert os.environ['FEDNANO_PROGRESS'] == 'off' and os.environ['HF_HUB_OFFLINE'] == '1'\n"
        "if 'fedavg' in d and d.endswith('s0'): print('boom'); sys.exit(3)\n"
        "json.dump({'config': {}, 'rounds': [], 'final': {'global_accuracy': 0.25}}, open(os.path.join(d, 'results.json'), 'w'))\n"
    )
    monkeypatch.setattr(sw, "command", lambda p: [sys.executable, "-c", script, str(p.run_dir)])
    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--jobs", "2"])
    assert r.exit_code == 1, r.output
    failed_dir = out / "fedavg" / "a1.0-c2-s0"
    assert "1 failed" in r.output and "3 done" in r.output and str(failed_dir / "run.log") in r.output
    summary = json.loads((out / "sweep.json").read_text())
    status = {Path(p["folder"]).relative_to(out).as_posix(): (p["status"], p["global_accuracy"]) for p in summary["points"]}
    assert status == {
        "fednano/a1.0-c2-s0": ("done", 0.25),
        "fednano/a1.0-c2-s1": ("done", 0.25),
        "fedavg/a1.0-c2-s0": ("failed", None),
        "fedavg/a1.0-c2-s1": ("done", 0.25),
    }
    assert "boom" in (failed_dir / "sweep.log").read_text()
    assert (failed_dir / "sweep-config.toml").exists()
    assert load_config(failed_dir / "sweep-config.toml").to_dict() == sw.load_sweep(path).points[2].cfg.to_dict()


def archived_sweep_file(tmp_path: Path, out: Path, keep: Path) -> Path:
    """The GRID sweep with `archive = keep`."""
    path = sweep_file(tmp_path, out, GRID)
    path.write_text(path.read_text().replace(f'output = "{out}"', f'output = "{out}"\narchive = "{keep}"'))
    return path


def planned_actions(dry_run_output: str) -> dict[str, str]:
    """run folder -> run / resume / skip, from `fednano sweep --dry-run`."""
    return {line.split()[1]: line.split()[0] for line in dry_run_output.splitlines() if line.startswith("  ") and "/" in line.split()[1]}


def test_finished_runs_are_archived_and_restored_into_a_fresh_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sweep.archive: each finished run's small files are kept there (no tensors); a fresh checkout's sweep copies them
    back and skips those runs, and runs the one that had failed."""
    out, keep = tmp_path / "out", tmp_path / "archive"
    path = archived_sweep_file(tmp_path, out, keep)
    script = (
        "import json, os, sys, tomllib; d = sys.argv[1]\n"
        "if 'fedavg' in d and d.endswith('s0'): sys.exit(3)\n"
        "cfg = tomllib.loads(open(os.path.join(d, 'sweep-config.toml')).read())\n"
        "open(os.path.join(d, 'adapters.safetensors'), 'wb').write(b'0' * 100)\n"
        "json.dump({'config': cfg, 'rounds': [], 'final': {'global_accuracy': 0.25}}, open(os.path.join(d, 'results.json'), 'w'))\n"
    )
    monkeypatch.setattr(sw, "command", lambda p: [sys.executable, "-c", script, str(p.run_dir)])
    r = CliRunner().invoke(app, ["sweep", "--config", str(path)])
    assert r.exit_code == 1 and "3 done" in r.output, r.output
    kept = sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*") if p.is_file())
    assert kept == [f"{m}/a1.0-c2-s{s}/{f}" for m, s in (("fedavg", 1), ("fednano", 0), ("fednano", 1))
                    for f in ("results.json", "sweep-config.toml")]  # what the runs left, without their tensors

    shutil.rmtree(out)  # a fresh checkout: the archive is all there is
    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    actions = planned_actions(r.output)
    assert actions == {"fednano/a1.0-c2-s0": "skip", "fednano/a1.0-c2-s1": "skip", "fedavg/a1.0-c2-s0": "run", "fedavg/a1.0-c2-s1": "skip"}
    assert (out / "fednano" / "a1.0-c2-s0" / "results.json").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace(f'archive = "{keep}"', "archive = 3"))
    with pytest.raises(ConfigError, match="sweep.archive must be a non-empty string path"):
        sw.load_sweep(bad)


def test_an_unfinished_run_is_archived_with_its_checkpoint_and_resumed_by_a_fresh_checkout(tmp_path: Path, monkeypatch) -> None:
    """A sitting that ends mid-run keeps its last completed round in the archive (results, configs, the checkpoint files
    results.json points at, the clients' state); a fresh checkout resumes it; when it finishes the tensors leave the archive."""
    out, keep = tmp_path / "out", tmp_path / "archive"
    path = archived_sweep_file(tmp_path, out, keep)
    script = (
        "import json, os, sys, time, tomllib; d = sys.argv[1]; j = lambda *p: os.path.join(d, *p)\n"
        "cfg = tomllib.loads(open(j('sweep-config.toml')).read()) if os.path.exists(j('sweep-config.toml')) else {}\n"
        "if 'fednano' in d and d.endswith('s0') and '--resume' not in sys.argv:\n"
        "    os.makedirs(j('checkpoint')); os.makedirs(j('client-state'))\n"
        "    for f in ('adapters-round-2', 'strategy-round-2', 'best-adapters-round-1', 'adapters-round-1'):\n"
        "        open(j('checkpoint', f + '.safetensors'), 'wb').write(f.encode())\n"
        "    open(j('client-state', 'lora-0.safetensors'), 'wb').write(b'personal')\n"
        "    open(j('config.toml'), 'w').write('# the run config')\n"
        "    ck = {'round': 2, 'adapters': 'checkpoint/adapters-round-2.safetensors',\n"
        "          'strategy': 'checkpoint/strategy-round-2.safetensors'}\n"
        "    best = {'round': 1, 'validation_accuracy': 0.5, 'adapters': 'checkpoint/best-adapters-round-1.safetensors'}\n"
        "    json.dump({'config': cfg, 'rounds': [{'round': 1}, {'round': 2}], 'final': {}, 'checkpoint': ck, 'best_validation': best},\n"
        "              open(j('results.json'), 'w'))\n"
        "    time.sleep(3); sys.exit(9)  # the sitting ends in round 3\n"
        "assert '--resume' not in sys.argv or open(j('checkpoint', 'adapters-round-2.safetensors')).read() == 'adapters-round-2'\n"
        "json.dump({'config': cfg, 'rounds': [], 'final': {'global_accuracy': 0.25}}, open(j('results.json'), 'w'))\n"
    )
    resumed = out / "fednano" / "a1.0-c2-s0"
    monkeypatch.setattr(sw, "command", lambda p: [sys.executable, "-c", script, str(p.run_dir)]
                        + (["--resume"] if p.action == "resume" else []))
    r = CliRunner().invoke(app, ["sweep", "--config", str(path)])
    assert r.exit_code == 1 and "3 done" in r.output, r.output
    kept = keep / "fednano" / "a1.0-c2-s0"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "checkpoint/adapters-round-2.safetensors", "checkpoint/best-adapters-round-1.safetensors",
        "checkpoint/strategy-round-2.safetensors", "client-state/lora-0.safetensors", "config.toml", "results.json",
        "sweep-config.toml"]  # not round 1's superseded adapters
    assert json.loads((kept / "results.json").read_text())["checkpoint"]["round"] == 2

    shutil.rmtree(out)  # the next sitting: a fresh checkout
    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--dry-run"])
    actions = planned_actions(r.output)
    others = ("fednano/a1.0-c2-s1", "fedavg/a1.0-c2-s0", "fedavg/a1.0-c2-s1")
    assert actions == {"fednano/a1.0-c2-s0": "resume"} | {k: "skip" for k in others}
    assert (resumed / "client-state" / "lora-0.safetensors").read_bytes() == b"personal"
    r = CliRunner().invoke(app, ["sweep", "--config", str(path)])
    assert r.exit_code == 0 and "resuming fednano/a1.0-c2-s0" in r.output, r.output
    assert sorted(p.name for p in kept.iterdir()) == ["config.toml", "results.json", "sweep-config.toml"]  # finished: no tensors
    assert json.loads((kept / "results.json").read_text())["final"] == {"global_accuracy": 0.25}


def test_archiving_an_unfinished_run_keeps_the_last_consistent_round(tmp_path: Path) -> None:
    """A round committed while its predecessor is being copied (a checkpoint file gone) leaves the archive as it was."""
    out, keep = tmp_path / "out", tmp_path / "archive"
    sweep = sw.Sweep(source=tmp_path / "s.toml", base_config=None, output=out, overrides={}, archive=keep)
    p = sw.Point(method="fednano", alpha=1.0, clients=2, seed=0, cfg=None, run_dir=out / "fednano" / "a1.0-c2-s0")  # type: ignore[arg-type]
    (p.run_dir / "checkpoint").mkdir(parents=True)
    assert not sw.archive_unfinished(sweep, p)  # nothing yet
    (p.run_dir / "checkpoint" / "adapters-round-1.safetensors").write_bytes(b"one")
    ck = {"round": 1, "adapters": "checkpoint/adapters-round-1.safetensors"}
    (p.run_dir / "results.json").write_text(json.dumps({"rounds": [{"round": 1}], "final": {}, "checkpoint": ck}))
    assert sw.archive_unfinished(sweep, p)
    ck2 = {"round": 2, "adapters": "checkpoint/adapters-round-2.safetensors"}
    (p.run_dir / "results.json").write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}], "final": {}, "checkpoint": ck2}))
    assert not sw.archive_unfinished(sweep, p)  # round 2's adapters are not on disk: round 1 stays archived, whole
    kept = keep / "fednano" / "a1.0-c2-s0"
    assert json.loads((kept / "results.json").read_text())["checkpoint"]["round"] == 1
    assert (kept / "checkpoint" / "adapters-round-1.safetensors").read_bytes() == b"one"
    assert not kept.with_name(kept.name + ".staging").exists()


# --------------------------------------------------------------------------- a real micro-sweep


def test_micro_sweep_resumable_and_report(tmp_path: Path, tiny_bundle: Path, tiny_cache: Path) -> None:
    out = tmp_path / "sweep-out"
    path = sweep_file(tmp_path, out, GRID)
    env = {**os.environ, "FEDNANO_CACHE": str(tiny_cache), "FEDNANO_PROGRESS": "off", "HF_HUB_OFFLINE": "1"}

    def fednano(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fednano", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    r = fednano("sweep", "--config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    dirs = [out / m / f"a1.0-c2-s{s}" for m in ("fednano", "fedavg") for s in (0, 1)]
    results = {}
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        assert res["final"] and len(res["rounds"]) == 1
        assert (d / "sweep-config.toml").exists() and (d / "config.toml").exists() and (d / "sweep.log").exists()
        results[d] = res
    assert results[dirs[1]]["config"]["data"]["seed"] == 1 and results[dirs[1]]["config"]["federation"]["seed"] == 1
    assert results[dirs[2]]["config"]["federation"]["strategy"] == "fedavg"
    summary = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in summary["points"]] == ["done"] * 4

    t0 = time.time()
    r = fednano("sweep", "--config", str(path), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.time() - t0 < 60 and "4 skipped" in r.stdout and "0 done" in r.stdout
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["skipped"] * 4

    r = fednano("report", str(out), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = out / "report"
    for name in ("table.md", "table.csv", "cost.md", "cost.csv", "curves.png", "accuracy_vs_bytes.png"):
        assert (rep / name).stat().st_size > 0, name
    assert "α=1 (2 clients)" in r.stdout and "fednano" in r.stdout and "fedavg" in r.stdout
    rows = {row["method"]: row for row in csv.DictReader((rep / "table.csv").open())}
    assert set(rows) == {"fednano", "fedavg"}
    for method, pair in (("fednano", dirs[:2]), ("fedavg", dirs[2:])):
        row = rows[method]
        g = [results[d]["final"]["global_accuracy"] for d in pair]
        loc = [sum(results[d]["final"]["client_accuracy"].values()) / len(results[d]["final"]["client_accuracy"]) for d in pair]
        assert (row["alpha"], row["clients"], row["seeds"]) == ("1.0", "2", "2")
        assert float(row["global_mean"]) == pytest.approx(sum(g) / 2)
        assert float(row["global_std"]) == pytest.approx(abs(g[0] - g[1]) / 2**0.5)
        assert float(row["local_mean"]) == pytest.approx(sum(loc) / 2)
        assert rp.format_cell(*rp.mean_std(g)) in (rep / "table.md").read_text()
    cost = {row["method"]: row for row in csv.DictReader((rep / "cost.csv").open())}
    wall = [sum(r["seconds"] for r in results[d]["rounds"]) / len(results[d]["rounds"]) for d in dirs[:2]]
    assert float(cost["fednano"]["wall_seconds_per_round"]) == pytest.approx(sum(wall) / 2)


def _validated(method: str, seed: int, val: list[float | None], best_test: float) -> dict:
    """A finished run with a validation set: `val` = [zero-shot, round 1, ...] validation accuracy (None: not
    validated that round); the global test set scored at the last round only, and at the best validation round."""
    res = fake_results(method, 0.1, 5, seed, [0.3] * len(val))
    res["zero_shot_validation_accuracy"] = val[0]
    for r, v in zip(res["rounds"], val[1:]):
        r["global_accuracy"] = None
        if v is not None:
            r["validation_accuracy"] = v
    res["rounds"][-1]["global_accuracy"] = 0.5
    best = max(range(1, len(val)), key=lambda i: (val[i] or -1, -i))
    res["final"]["best_validation"] = {"round": best, "validation_accuracy": val[best], "global_accuracy": best_test}
    return res


def test_convergence_rounds_and_bytes_to_target_from_validation_curves(tmp_path) -> None:
    root = tmp_path / "runs"
    # centralized's best validation scores 0.8 and 0.9: the target is 0.9 × 0.85 = 0.765
    write_run(root, _validated("centralized", 0, [0.3, 0.6, 0.8, 0.8], 0.80))
    write_run(root, _validated("centralized", 1, [0.3, 0.7, 0.8, 0.9], 0.85))
    write_run(root, _validated("fednano", 0, [0.3, 0.5, 0.7, 0.77], 0.70))  # reaches it at round 3
    write_run(root, _validated("fednano", 1, [0.3, 0.8, 0.6, 0.7], 0.75))  # at round 1
    write_run(root, _validated("fedavg", 0, [0.3, None, 0.5, 0.6], 0.60))  # never; round 1 not validated
    write_run(root, _validated("fedavg", 1, [0.3, None, 0.7, 0.6], 0.65))
    rep = publish.build_report([root], tmp_path / "report")
    runs = rp.load_runs([root])[0]
    assert rp.progress_curve(next(r for r in runs if r.method == "fedavg").results)[:2] == [0.3, None]  # validation, not test
    conv = {c.method: c for c in cv.convergence(runs)}
    assert conv["fednano"].target == pytest.approx(0.765) and "centralized's best (85.0)" in conv["fednano"].reference
    assert conv["fednano"].rounds == [3, 1] and conv["fednano"].mib == [24.0, 8.0]  # 8 MiB a round
    assert conv["fedavg"].rounds == [None, None] and conv["centralized"].rounds == [2, 2]
    assert conv["fednano"].best_rounds == [3, 1] and conv["fedavg"].best_rounds == [3, 2]
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "report" / "convergence.csv").open())}
    assert (rows["fednano"]["reached"], float(rows["fednano"]["rounds_mean"]), float(rows["fednano"]["mib_mean"])) == ("2", 2.0, 16.0)
    assert rows["fedavg"]["reached"] == "0" and rows["fedavg"]["rounds_mean"] == ""
    assert "| fednano | α=0.1 (5 clients) | 76.5 | 2.0 ± 1.4 (2/2) | 16.0 | 2.0 ± 1.4 |" in rep.convergence_table
    assert "| fedavg | α=0.1 (5 clients) | 76.5 | never (0/2) | — |" in rep.convergence_table
    # the test accuracy at the best validation round: its own table, and paired (fednano − fedavg: +10, +10)
    assert "| fednano | 72.5 ± 3.5 |" in rep.best_table and "| centralized | **82.5 ± 3.5** |" in rep.best_table
    assert "| fednano − fedavg | +10.0 [+10.0, +10.0] (2/2) |" in rep.paired_table.split("best validation round")[1]
    best = [r for r in csv.DictReader((tmp_path / "report" / "paired.csv").open()) if r["metric"] == "best" and r["method"] == "fedavg"]
    assert float(best[0]["mean_difference"]) == pytest.approx(0.1)
    for name in ("convergence.png", "curves.png", "accuracy_vs_bytes.png", "convergence.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_convergence_without_a_centralized_run_aims_at_the_best_method() -> None:
    runs = [rp.Run(Path("a"), _validated("fednano", 0, [0.2, 0.4, 0.6], 0.5)),
            rp.Run(Path("b"), _validated("fedavg", 0, [0.2, 0.5, 0.5], 0.5))]
    (c_nano, c_avg) = cv.convergence(runs, fraction=0.8)
    assert c_nano.target == pytest.approx(0.48) and "fednano, 60.0; no centralized run" in c_nano.reference
    assert c_nano.rounds == [2] and c_avg.rounds == [1]


def test_the_rule_for_when_a_validation_curve_has_flattened() -> None:
    curve = [(2, 0.70), (4, 0.75), (6, 0.80), (8, 0.80), (10, 0.79), (12, 0.82), (14, 0.80), (16, 0.80), (18, 0.80), (20, 0.80),
             (22, 0.81), (24, 0.80)]
    # r=2: 0.75 comes (> 0.70 + 0.01); r=4: 0.80; r=6, 8, 10: 0.82 at round 12; r=12: best 0.82, rounds 13..22 stay below
    assert cv.flattened_round(curve) == 12
    assert cv.flattened_round(curve, tolerance=0.03) == 6  # 0.82 is within 0.03 of 0.80
    assert cv.flattened_round(curve[:6]) is None  # r=2 fails, and no later round has 10 rounds scored after it
    assert cv.flattened_round([]) is None


def test_privacy_settings_name_their_own_rows_and_are_paired_against_the_plain_method(tmp_path):
    """A DP table's sweeps land in one report: each privacy level is a row of its own (no mixing note), paired with the
    non-private baseline seed by seed."""
    assert rp.privacy_label({}) == "" and rp.privacy_label({"client_dp": False, "noise_multiplier": 1.0}) == ""
    assert rp.privacy_label({"dp_sgd": True, "target_epsilon": 8.0}) == "DP-SGD ε=8"
    assert rp.privacy_label({"client_dp": True, "target_epsilon": 0.0, "noise_multiplier": 1.5}) == "client DP σ=1.5"
    assert rp.privacy_label({"label_epsilon": 2.0, "embedding_noise": 5.0}) == "label DP ε=2, text noise 5"
    for seed in (0, 1):
        for name, privacy, acc in (("plain", {}, 0.7), ("sgd8", {"dp_sgd": True, "target_epsilon": 8.0}, 0.5)):
            res = fake_results("fednano", 1.0, 100, seed, [0.4, acc + 0.01 * seed])
            res["config"]["privacy"].update(privacy)
            d = tmp_path / name / f"s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(res))
    runs, _, _ = rp.load_runs([tmp_path])
    cells = rp.summarize(runs)
    assert [c.method for c in cells] == ["fednano", "fednano (DP-SGD ε=8)"]
    assert not rp.config_notes(runs)  # the privacy settings are the rows, not a mixed cell
    paired = rp.paired_difference(cells[0], cells[1])
    assert paired.mean == pytest.approx(0.2) and paired.n == 2


def test_the_privacy_table_reads_leakage_epsilon_and_paired_cost_from_the_runs(tmp_path):
    """privacy.md: each privacy setting a row with what the server read at the last audited round, the ε spent, the
    accuracy and its paired cost against the plain method; written only when a run has a privacy setting or an audit."""
    from fednano.experiments import privacy_report as pr

    leak = {"text_tokens_recovered": 1.0, "text_tokens": 40, "answer_tokens_in_clear": 1.0, "answer_tokens": 10,
            "image_top1": 1.0, "images": 8, "image_pool": 20}
    settings = (("plain", {}, {}, 0.70, 1.0), ("noise", {"embedding_noise": 10.0}, {}, 0.60, 0.25),
                ("sgd", {"dp_sgd": True, "target_epsilon": 8.0}, {"dp_epsilon": 7.9}, 0.50, 1.0))
    for seed in (0, 1):
        for name, privacy, extra, acc, text in settings:
            res = fake_results("fednano", 1.0, 5, seed, [0.4, 0.5, acc - 0.02 * seed],
                               extra_round={"leakage": {**leak, "text_tokens_recovered": text}, **extra})
            res["rounds"][0]["leakage"] = leak  # round 1 leaked everything; the table reads the last audited round
            res["config"]["privacy"].update(privacy)
            d = tmp_path / name / f"s{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(res))
    runs, _, _ = rp.load_runs([tmp_path])
    rows = {r["method"]: r for r in pr.privacy_rows(runs)}
    assert list(rows) == ["fednano", "fednano (DP-SGD ε=8)", "fednano (text noise 10)"]
    noise, sgd, plain = rows["fednano (text noise 10)"], rows["fednano (DP-SGD ε=8)"], rows["fednano"]
    assert noise["text_tokens_recovered"] == 0.25 and noise["answer_tokens_in_clear"] == 1.0 and noise["epsilon"] is None
    assert sgd["epsilon"] == pytest.approx(7.9) and plain["paired"] is None
    assert noise["paired"].mean == pytest.approx(0.10) and noise["paired"].n == 2 and noise["paired"].wins == 2
    assert noise["accuracy"] == pytest.approx(0.59) and noise["mib_per_round"] == pytest.approx(8.0)
    md = pr.privacy_markdown(list(rows.values()))
    line = next(x for x in md.splitlines() if x.startswith("| fednano (text noise 10)"))
    assert "| 0.250 | 1.000 | 1.000 | — | 59.0 ± 1.4 | +10.0 [+10.0, +10.0] (2/2) | 8.00 |" in line
    assert "7.90" in next(x for x in md.splitlines() if x.startswith("| fednano (DP-SGD"))
    table = list(csv.DictReader(io.StringIO(pr.privacy_csv(list(rows.values())))))
    assert float(table[2]["plain_minus_this"]) == pytest.approx(0.10) and table[0]["plain_minus_this"] == ""

    rep_dir = tmp_path / "report"
    publish.build_report([tmp_path], rep_dir)
    assert "text noise 10" in (rep_dir / "privacy.md").read_text() and (rep_dir / "privacy.csv").is_file()
    plain_only = [r for r in runs if r.method == "fednano"]
    for r in plain_only:
        for rnd in r.results["rounds"]:
            rnd.pop("leakage")
    assert pr.privacy_rows(plain_only) == []  # no setting, no audit: no privacy table
    assert rp.privacy_label({}, {"label_private": True}) == "label-private"


def test_the_dp_tables_put_the_methods_side_by_side_at_each_target_epsilon(tmp_path):
    """dp.md: per DP kind, rows = target ε then ∞ (the same methods without privacy), columns = methods, the ε spent, and
    fednano − fedavg seed by seed; runs with another privacy setting, or DP by σ alone, are not rows."""
    from fednano.experiments import privacy_report as pr

    settings = (("plain", {}, None, 0.70), ("c1", {"client_dp": True, "target_epsilon": 1.0}, 0.98, 0.40),
                ("c8", {"client_dp": True, "target_epsilon": 8.0}, 7.9, 0.60),
                ("s8", {"dp_sgd": True, "target_epsilon": 8.0}, 7.99, 0.55),
                ("sigma", {"client_dp": True, "target_epsilon": 0.0, "noise_multiplier": 1.0}, 3.0, 0.5),
                ("mixed", {"dp_sgd": True, "target_epsilon": 8.0, "embedding_noise": 5.0}, 8.0, 0.5))
    for seed in (0, 1):
        for method, lift in (("fednano", 0.0), ("fedavg", -0.05 - 0.01 * seed)):
            for name, privacy, spent, acc in settings:
                res = fake_results(method, 1.0, 100, seed, [0.4, acc + lift + 0.02 * seed],
                                   extra_round={"dp_epsilon": spent} if spent else None)
                res["config"]["privacy"].update(privacy)
                d = tmp_path / name / method / f"s{seed}"
                d.mkdir(parents=True)
                (d / "results.json").write_text(json.dumps(res))
    runs, _, _ = rp.load_runs([tmp_path])
    assert {pr.dp_level(r) for r in runs} == {("", math.inf), ("client_dp", 1.0), ("client_dp", 8.0), ("dp_sgd", 8.0), None}
    rows = pr.dp_rows(runs)
    assert [(r["kind"], r["epsilon"], r["method"], r["cell"].n) for r in rows] == [
        (k, e, m, 2) for k, eps in (("client_dp", (1.0, 8.0, math.inf)), ("dp_sgd", (8.0, math.inf)))
        for e in eps for m in ("fednano", "fedavg")]
    c1 = next(r for r in rows if r["kind"] == "client_dp" and r["epsilon"] == 1.0 and r["method"] == "fedavg")
    assert c1["cell"].global_acc == pytest.approx([0.35, 0.36]) and c1["spent"] == pytest.approx(0.98)
    md = pr.dp_markdown(rows)
    client, sgd = md.split("**sample-level DP-SGD")
    assert client.startswith("**client-level DP, α=1 (100 clients)**")
    # fednano 0.40, 0.42 vs fedavg 0.35, 0.36: +5, +6 points -> +5.5, t(0.975, 1) · 0.707 / √2 = 6.35
    assert "| 1 | 41.0 ± 1.4 (n=2), ε spent 0.98 | 35.5 ± 0.7 (n=2), ε spent 0.98 | +5.5 [-0.9, +11.9] (2/2) |" in client
    assert "| ∞ (no DP) | 71.0 ± 1.4 (n=2) | 65.5 ± 0.7 (n=2) | +5.5 [-0.9, +11.9] (2/2) |" in sgd
    table = list(csv.DictReader(io.StringIO(pr.dp_csv(rows))))
    assert table[4]["target_epsilon"] == "inf" and float(table[0]["accuracy_mean"]) == pytest.approx(0.41)
    publish.build_report([tmp_path], tmp_path / "rep")
    assert "sample-level DP-SGD" in (tmp_path / "rep" / "dp.md").read_text()
    assert pr.dp_rows([r for r in runs if pr.dp_level(r) == ("", math.inf)]) == []  # no DP run: no table


def test_a_run_older_than_a_field_is_not_a_mixed_table_when_the_newer_runs_keep_its_default(tmp_path):
    old, new = (fake_results("fednano", 0.1, 5, s, [0.4, 0.6]) for s in (0, 1))
    del old["config"]["privacy"]["fisher_groups"]  # recorded before the field existed: it ran as its default
    runs = [rp.Run(tmp_path / "a", old), rp.Run(tmp_path / "b", new)]
    assert rp.config_notes(runs) == []
    new["config"]["train"]["local_steps"] = 99  # a real difference is still named
    assert rp.config_notes(runs) == ["runs differ in train.local_steps (25, 99): the table mixes them"]


def _cell(method: str, best: list[float], last: list[float] | None = None) -> rp.Cell:
    seeds = list(range(len(best)))
    return rp.Cell(method, 0.1, 5, seeds, global_acc=list(last or best), local_by_run=[None] * len(best), best_by_run=list(best))


def test_each_claim_is_decided_by_its_stated_rule_from_the_paired_interval() -> None:
    from fednano.experiments import verdicts as vd

    base = [0.60, 0.50, 0.70]
    higher = vd.Claim("a > b", "a", "b")
    at_least = vd.Claim("a ≥ b", "a", "b", vd.MARGIN)

    def decided(claim: vd.Claim, diffs: list[float]) -> str:
        a, b = _cell("a", [x + d for x, d in zip(base, diffs)]), _cell("b", base)
        return claim.decide(rp.paired_difference(a, b, "best"))

    # diffs +5, +7, +6: mean 6, sd 1, t(0.975, 2) = 4.303 -> [3.5, 8.5] points: above 0
    assert decided(higher, [0.05, 0.07, 0.06]) == "holds" and decided(at_least, [0.05, 0.07, 0.06]) == "holds"
    assert decided(higher, [-0.05, -0.07, -0.06]) == "refuted" and decided(at_least, [-0.05, -0.07, -0.06]) == "refuted"
    # -0.5, 0, +0.5: [-1.24, +1.24] points: within the 2-point margin of "≥", not above 0 for ">"
    assert decided(at_least, [-0.005, 0.0, 0.005]) == "holds"
    assert decided(higher, [-0.005, 0.0, 0.005]) == "inconclusive"
    # -1, 0, +1: [-2.48, +2.48]: the margin is not cleared
    assert decided(at_least, [-0.01, 0.0, 0.01]) == "inconclusive"
    assert decided(higher, [0.05]) == "too few seeds"
    # two seeds never decide, not even with a zero-width interval (both seeds 2.4 points lower)
    b2 = _cell("b", [0.60, 0.50])
    assert higher.decide(rp.paired_difference(_cell("a", [0.576, 0.476]), b2, "best")) == "too few seeds"


def test_verdicts_give_the_share_of_the_gap_to_centralized_a_variant_closes(tmp_path: Path) -> None:
    from fednano.experiments import verdicts as vd

    cells = [_cell("fednano", [0.60, 0.60], last=[0.5, 0.5]), _cell("fednano-ffa", [0.70, 0.66], last=[0.5, 0.6]),
             _cell("centralized", [0.80, 0.80], last=[0.9, 0.7])]
    rows = {(r.claim.method, r.metric): r for r in vd.verdicts(cells)}
    assert set(rows) == {("fednano-ffa", "best"), ("fednano-ffa", "global")}  # no other claim has both of its methods
    assert rows["fednano-ffa", "best"].gap_closed == pytest.approx(0.08 / 0.20)  # gains 0.10, 0.06; gaps 0.20, 0.20
    assert rows["fednano-ffa", "global"].gap_closed == pytest.approx(0.05 / 0.30)
    assert rows["fednano-ffa", "best"].paired.mean == pytest.approx(0.08)
    md = vd.verdicts_markdown(list(rows.values()))
    assert "40 %" in md and "17 %" in md
    csv_rows = list(csv.DictReader(io.StringIO(vd.verdicts_csv(list(rows.values())))))
    assert [float(r["gap_closed"]) for r in csv_rows] == pytest.approx([0.4, 0.05 / 0.30])
    # without centralized, or with centralized no better than fednano, there is no gap to close
    assert vd.gap_closed(cells[1], cells[0], None, "best") is None
    assert vd.gap_closed(cells[1], cells[0], _cell("centralized", [0.6, 0.55]), "best") is None

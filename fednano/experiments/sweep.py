"""`fednano sweep`: a grid of runs (methods x Dirichlet alpha x clients x seeds), each in
its own results folder, each in its own `fednano run` subprocess; resumable.

SWEEP.toml::

    [sweep]
    base_config = "../configs/default.toml"   # a run config, relative to this file; optional (defaults apply)
    output = "results/sweep"                  # where run folders go, relative to the current directory
    archive = "benchmarks/runs/sweep"         # optional: finished runs' results.json, configs and table are copied here,
                                              # and copied back into `output` when missing there (a fresh checkout);
                                              # a running run's last completed round too (with its checkpoint), so that
                                              # a fresh checkout resumes it instead of starting it over
    [sweep.set]                               # overrides for every run, like `fednano run --set`
    "train.local_steps" = 15                  # (quoted dotted keys, or nested tables: [sweep.set.train])
    "data.global_test_samples" = 200
    [[grid]]                                  # one or more grids; their union is run
    methods = ["fednano", "fedavg"]          # federation.strategy
    alphas = [0.1, 1.0, 5.0]                  # data.dirichlet_alpha
    num_clients = [5]                         # data.num_clients
    seeds = [0, 1, 2]                         # data.seed AND federation.seed
    [[grid]]                                  # a variant: a grid with settings of its own
    variant = "text-noise-5"                  # names its runs' folder: <output>/<variant>/<method>/...
    methods = ["fednano"]
    [grid.set]                                # overrides for this grid's runs only (after [sweep.set])
    "privacy.embedding_noise" = 5.0

A key left out of a grid takes its single value from the base config (after
`[sweep.set]` and the grid's `set`); grid values override both. Each point runs in
`<output>/<method>/a<alpha>-c<clients>-s<seed>` (e.g. `fednano/a0.1-c5-s0`), or
`<output>/<variant>/<method>/...` in a variant; a point listed by several grids runs once.

Every point's config is built and validated before anything runs. A folder whose
`results.json` has a non-empty `final` is skipped; one with completed rounds but
no `final` (an interrupted run) is continued with `fednano run --resume`; a folder
whose `results.json` was made with a different config stops the sweep (configs are
never mixed). The sweep writes `<run dir>/sweep-config.toml` (the run's full config)
and appends the subprocess's output to `<run dir>/sweep.log`; `<output>/sweep.json`
lists every point with its status, folder and final global accuracy. A failed run
does not stop the sweep; they are listed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednano.config import ConfigError, RunConfig, load_config, read_toml, same_config
from fednano.io import atomic_write_text

GRID_KEYS = {"methods": "federation.strategy", "alphas": "data.dirichlet_alpha", "num_clients": "data.num_clients", "seeds": "data.seed"}
GRID_EXTRA = ("variant", "set")  # a grid's own settings, named by its variant
AXIS_FIELDS = {*GRID_KEYS.values(), "federation.seed"}  # set by the grid's axes, never by a `set`
VARIANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
SWEEP_KEYS = ("base_config", "output", "set", "archive")
ARCHIVED = ("results.json", "config.toml", "sweep-config.toml", "table.md")  # what a finished run leaves in the archive: no tensors
# what an unfinished run also keeps there, to be resumed by a later sitting: the checkpoint of its last completed round (global
# adapters and strategy state, a few hundred KB at the default) and the simulated clients' own state (feddpa-f's personal LoRAs)
RESUMABLE = ("checkpoint", "client-state")


@dataclass
class Point:
    """One grid point: its config, its folder and what the sweep will do with it."""

    method: str
    alpha: float
    clients: int
    seed: int
    cfg: RunConfig
    run_dir: Path
    variant: str = ""  # the grid's variant ("" for a plain grid)
    action: str = "run"  # run | resume | skip
    status: str = "pending"  # pending | done | skipped | failed
    accuracy: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.variant + '/' if self.variant else ''}{self.method}/{run_dir_name(self.alpha, self.clients, self.seed)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "variant": self.variant,
            "alpha": self.alpha,
            "clients": self.clients,
            "seed": self.seed,
            "folder": str(self.run_dir),
            "action": self.action,
            "status": self.status,
            "global_accuracy": self.accuracy,
            "seconds": self.seconds,
            "returncode": self.returncode,
            "error": self.error,
        }


@dataclass
class Sweep:
    source: Path
    base_config: Path | None
    output: Path
    overrides: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    archive: Path | None = None  # where finished runs' small files are kept (e.g. in the repository), and restored from


def run_dir_name(alpha: float, clients: int, seed: int) -> str:
    return f"a{float(alpha)!r}-c{clients}-s{seed}"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _dotted(where: str, table: dict[str, Any]) -> dict[str, Any]:
    """A set table's overrides as {"section.field": value}; a key of another depth is refused, named."""
    overrides = _flatten(table)
    for key in overrides:
        if key.count(".") != 1:
            raise ConfigError(f"{where} key {key!r}: expected \"section.field\"")
    return overrides


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: must be a non-empty list")
    return value


def load_sweep(path: Path) -> Sweep:
    """Parse SWEEP.toml and build + validate every grid point's RunConfig (nothing runs)."""
    path = Path(path)
    data = read_toml(path, "sweep file")
    unknown = set(data) - {"sweep", "grid"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected [sweep] and [[grid]]")
    sweep = _sweep_table(path, data.get("sweep", {}))
    grids = data.get("grid")
    if not isinstance(grids, list) or not grids:
        raise ConfigError(f"{path}: needs at least one [[grid]] table")
    seen: dict[tuple, dict[str, Any]] = {}
    for gi, grid in enumerate(grids, 1):
        where = f"{path}: grid #{gi}"
        variant, sets = _grid_variant(where, grid)
        defaults = _grid_defaults(sweep, sets, where if variant else None)
        for method, alpha, clients, seed in _grid_points(where, grid, defaults):
            key = (variant, method, float(alpha), clients, seed)
            if key in seen:
                if seen[key] != sets:
                    raise ConfigError(f"{where}: variant {variant!r} is set differently by an earlier grid; one variant, one setting")
                continue
            seen[key] = sets
            sweep.points.append(_point(sweep, where, method, alpha, clients, seed, variant, sets))
    return sweep


def _grid_variant(where: str, grid: Any) -> tuple[str, dict[str, Any]]:
    """A grid's variant name and its own overrides ("", {} for a plain grid); checked."""
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: must be a table")
    variant, sets = grid.get("variant", ""), grid.get("set", {})
    if not isinstance(variant, str) or not set(variant) <= VARIANT_CHARS or variant in (".", ".."):
        raise ConfigError(f"{where}: variant must be a folder name (letters, digits, '.', '_', '-'), not {variant!r}")
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: [grid.set] must be a table")
    sets = _dotted(f"{where}: set", sets)
    if sets and not variant:
        raise ConfigError(f"{where}: a grid with its own `set` needs a `variant` name (its runs' folder)")
    for key in sets:
        if key in AXIS_FIELDS:
            raise ConfigError(f"{where}: set key {key!r} is a grid axis; use the grid's {_axis_of(key)} list")
    return variant, sets


def _axis_of(field_name: str) -> str:
    return next((k for k, v in GRID_KEYS.items() if v == field_name), "seeds")


def _sweep_table(path: Path, table: Any) -> Sweep:
    """The [sweep] table: base config, output folder, overrides for every run."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [sweep] must be a table")
    bad = set(table) - set(SWEEP_KEYS)
    if bad:
        raise ConfigError(f"{path}: unknown key(s) in [sweep]: {sorted(bad)}; known: {list(SWEEP_KEYS)}")
    base = table.get("base_config")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: sweep.base_config must be a string path")
    base_path = (path.parent / base) if base else None
    if base_path is not None and not base_path.exists():
        raise ConfigError(f"{path}: sweep.base_config {base_path} not found")
    output = table.get("output", "results/sweep")
    if not isinstance(output, str) or not output:
        raise ConfigError(f"{path}: sweep.output must be a non-empty string path")
    sets = table.get("set", {})
    if not isinstance(sets, dict):
        raise ConfigError(f"{path}: [sweep.set] must be a table")
    overrides = _dotted(f"{path}: sweep.set", sets)
    archive = table.get("archive")
    if archive is not None and (not isinstance(archive, str) or not archive):
        raise ConfigError(f"{path}: sweep.archive must be a non-empty string path")
    return Sweep(source=path, base_config=base_path, output=Path(output), overrides=overrides, archive=Path(archive) if archive else None)


def archived(sweep: Sweep, p: Point) -> Path | None:
    """Where a point's finished run is kept in the sweep's archive (None without an archive)."""
    return sweep.archive / p.run_dir.relative_to(sweep.output) if sweep.archive else None


def restore(sweep: Sweep) -> list[Point]:
    """Copy back, into the sweep's output, every archived finished run whose folder is not there (a fresh checkout
    keeps the archive, not the output): those points are then skipped. Returns them."""
    back = []
    for p in sweep.points:
        src = archived(sweep, p)
        if src is None or (p.run_dir / "results.json").exists() or not (src / "results.json").exists():
            continue
        p.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED:
            if (src / name).exists():
                shutil.copy2(src / name, p.run_dir / name)
        for name in RESUMABLE:  # an unfinished run's: it is resumed after its last archived round
            if (src / name).is_dir():
                shutil.copytree(src / name, p.run_dir / name, dirs_exist_ok=True)
        back.append(p)
    return back


def archive_run(sweep: Sweep, p: Point) -> None:
    """Keep a finished run's small files (results, configs, table; no tensors) in the sweep's archive, replacing what an
    unfinished one had kept there."""
    dst = archived(sweep, p)
    if dst is None:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for stale in (*(dst / n for n in RESUMABLE), dst.with_name(dst.name + ".staging")):
        shutil.rmtree(stale, ignore_errors=True)
    for name in ARCHIVED:
        if (p.run_dir / name).exists():
            shutil.copy2(p.run_dir / name, dst / name)


def checkpoint_files(results: dict[str, Any]) -> list[str]:
    """The files under checkpoint/ that a run's results.json points at (what `fednano run --resume` reads)."""
    refs = [v for k in ("checkpoint", "best_validation") for v in (results.get(k) or {}).values()]
    return sorted({v for v in refs if isinstance(v, str) and v.startswith("checkpoint/")})


def archive_unfinished(sweep: Sweep, p: Point) -> bool:
    """Keep an unfinished run's last completed round in the archive (its results.json, configs, the checkpoint files that
    results.json points at, and the clients' state), so that a later sitting resumes it after that round instead of
    starting over. Staged beside and swapped in, so the archive always holds one consistent round. False when there is
    nothing to keep yet, or when the next round was committed while copying (the caller tries again)."""
    dst, src = archived(sweep, p), p.run_dir / "results.json"
    if dst is None or not src.exists():
        return False
    text = src.read_text()
    try:
        results = json.loads(text)
    except json.JSONDecodeError:  # (results.json is written atomically; a foreign file)
        return False
    if results.get("final") or not results.get("checkpoint"):
        return False
    stage = dst.with_name(dst.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "checkpoint").mkdir(parents=True)
    try:
        for rel in checkpoint_files(results):
            shutil.copy2(p.run_dir / rel, stage / rel)
        if (p.run_dir / "client-state").is_dir():
            shutil.copytree(p.run_dir / "client-state", stage / "client-state")
    except FileNotFoundError:  # a newer round replaced these files meanwhile
        shutil.rmtree(stage)
        return False
    for name in ARCHIVED[1:]:
        if (p.run_dir / name).exists():
            shutil.copy2(p.run_dir / name, stage / name)
    (stage / "results.json").write_text(text)
    shutil.rmtree(dst, ignore_errors=True)
    stage.rename(dst)
    return True


def _grid_defaults(sweep: Sweep, sets: dict[str, Any] | None = None, where: str | None = None) -> dict[str, Any]:
    """A grid axis left out takes its one value from the base config (after [sweep.set] and the grid's own `set`)."""
    try:
        base = load_config(sweep.base_config, {**sweep.overrides, **(sets or {})})
    except ConfigError as e:
        what = f"{where}: base config with [sweep.set] and the grid's set" if where else f"{sweep.source}: base config with [sweep.set]"
        raise ConfigError(f"{what}: {e}") from None
    if base.model.random_init:
        raise ConfigError(f"{sweep.source}: model.random_init: a sweep compares accuracies, which random weights do not have")
    return {"methods": base.federation.strategy, "alphas": base.data.dirichlet_alpha, "num_clients": base.data.num_clients,
            "seeds": base.data.seed}


def _grid_points(where: str, grid: Any, defaults: dict[str, Any]) -> list[tuple[Any, Any, Any, Any]]:
    """Every (method, alpha, clients, seed) of one [[grid]] table (a table: _grid_variant checked it), each value checked."""
    bad = set(grid) - set(GRID_KEYS) - set(GRID_EXTRA)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}; known: {[*GRID_KEYS, *GRID_EXTRA]}")
    axes = {k: _as_list(grid[k], f"{where}: {k}") if k in grid else [defaults[k]] for k in GRID_KEYS}
    points = [(m, a, c, s) for m in axes["methods"] for a in axes["alphas"] for c in axes["num_clients"] for s in axes["seeds"]]
    for method, alpha, clients, seed in points:
        desc = f"{where}, point (method={method!r}, alpha={alpha!r}, num_clients={clients!r}, seed={seed!r})"
        if not isinstance(method, str):
            raise ConfigError(f"{desc}: methods must be strings")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConfigError(f"{desc}: alphas must be numbers")
        for name, v in (("num_clients", clients), ("seeds", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{desc}: {name} must be integers")
    return points


def _point(sweep: Sweep, where: str, method: str, alpha: float, clients: int, seed: int, variant: str = "",
           sets: dict[str, Any] | None = None) -> Point:
    """One grid point's validated config and folder."""
    overrides = {**sweep.overrides, **(sets or {}), "federation.strategy": method, "data.dirichlet_alpha": float(alpha),
                 "data.num_clients": clients, "data.seed": seed, "federation.seed": seed}
    try:
        cfg = load_config(sweep.base_config, overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}, point (method={method!r}, alpha={alpha!r}, num_clients={clients!r}, seed={seed!r}): {e}") from None
    folder = sweep.output / variant if variant else sweep.output
    return Point(method, float(alpha), clients, seed, cfg, folder / method / run_dir_name(alpha, clients, seed), variant)


def _normalised(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True))


def plan(sweep: Sweep) -> None:
    """Decide, per point, run / resume / skip from what its folder holds.

    Raises ConfigError when a folder holds a run made with a different config."""
    restore(sweep)
    for p in sweep.points:
        results = p.run_dir / "results.json"
        p.action = "run"
        if not results.exists():
            continue
        try:
            data = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p.run_dir}: unreadable results.json ({e}); move the folder away or fix it") from None
        if not same_config(data.get("config"), p.cfg):
            diff = _config_diff(data.get("config") or {}, p.cfg.to_dict())
            raise ConfigError(
                f"{p.run_dir}: holds a run made with a different config than {sweep.source} now asks for"
                f" ({diff}); move that folder away or change the sweep's output"
            )
        if data.get("final"):
            p.action = "skip"
            acc = data["final"].get("global_accuracy")
            p.accuracy = float(acc) if isinstance(acc, (int, float)) else None
        elif data.get("rounds"):
            p.action = "resume"


def _config_diff(old: dict, new: dict, limit: int = 4) -> str:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            diffs.append(section)
            continue
        for k in sorted(set(a) | set(b)):
            if _normalised(a.get(k, "<missing>")) != _normalised(b.get(k, "<missing>")):
                diffs.append(f"{section}.{k}: {a.get(k, '<missing>')!r} there, {b.get(k, '<missing>')!r} now")
    more = f", and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def command(p: Point) -> list[str]:
    if p.action == "resume":
        return [sys.executable, "-m", "fednano", "run", "--resume", str(p.run_dir)]
    return [sys.executable, "-m", "fednano", "run", "--config", str(p.run_dir / "sweep-config.toml"), "--output", str(p.run_dir)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["FEDNANO_PROGRESS"] = "off"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def write_summary(sweep: Sweep) -> Path:
    sweep.output.mkdir(parents=True, exist_ok=True)
    path = sweep.output / "sweep.json"
    payload = {
        "sweep": str(sweep.source),
        "base_config": str(sweep.base_config) if sweep.base_config else None,
        "set": sweep.overrides,
        "points": [p.as_dict() for p in sweep.points],
    }
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path


def _finish(p: Point, returncode: int, seconds: float) -> None:
    p.returncode, p.seconds = returncode, round(seconds, 1)
    final: dict = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        final = json.loads((p.run_dir / "results.json").read_text()).get("final") or {}
    if returncode == 0 and final:
        p.status = "done"
        acc = final.get("global_accuracy")
        p.accuracy = float(acc) if isinstance(acc, (int, float)) else None
    else:
        p.status = "failed"
        p.error = f"exit code {returncode}" if returncode != 0 else "the run exited without final results"


def execute(sweep: Sweep, jobs: int = 1) -> list[Point]:
    """Run every non-skipped point (up to `jobs` subprocesses at once); returns the failed ones."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    for p in sweep.points:
        if p.action == "skip":
            p.status = "skipped"
    todo = [p for p in sweep.points if p.action != "skip"]
    write_summary(sweep)
    env = child_env()
    running: list[tuple[Point, subprocess.Popen, Any, float]] = []
    queue = list(todo)
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(sweep.points), completed=len(sweep.points) - len(todo))
        for p in sweep.points:
            if p.status == "skipped":
                acc = f"{p.accuracy:.4f}" if p.accuracy is not None else "?"
                progress.console.print(f"skipped  {escape(p.name)}  (finished before: global accuracy {acc})")
        try:
            _loop(sweep, queue, running, jobs, env, progress, task)
        finally:
            for _, proc, logf, _ in running:  # interrupted (Ctrl-C, error): stop the runs we started
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                logf.close()
    write_summary(sweep)
    return [p for p in sweep.points if p.status == "failed"]


def _keep_progress(sweep: Sweep, p: Point, committed: dict[Path, int]) -> None:
    """Archive a running run's last completed round whenever its results.json changed (`committed`: the version kept)."""
    try:
        stamp = (p.run_dir / "results.json").stat().st_mtime_ns
    except FileNotFoundError:
        return
    if committed.get(p.run_dir) != stamp and archive_unfinished(sweep, p):
        committed[p.run_dir] = stamp


def _loop(sweep: Sweep, queue: list[Point], running: list, jobs: int, env: dict[str, str], progress: Any, task: Any) -> None:
    from rich.markup import escape

    committed: dict[Path, int] = {}  # results.json versions of running runs already archived
    while queue or running:
        while queue and len(running) < max(1, jobs):
            p = queue.pop(0)
            p.run_dir.mkdir(parents=True, exist_ok=True)
            if p.action == "run":
                (p.run_dir / "sweep-config.toml").write_text(p.cfg.to_toml())
            logf = open(p.run_dir / "sweep.log", "a")  # noqa: SIM115 - closed when the run ends
            cmd = command(p)
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            running.append((p, proc, logf, time.time()))
            progress.console.print(f"{'resuming' if p.action == 'resume' else 'started '} {escape(p.name)}")
        progress.update(task, description=", ".join(r[0].name for r in running))
        time.sleep(0.5)
        still = []
        for p, proc, logf, t0 in running:
            rc = proc.poll()
            if rc is None:
                _keep_progress(sweep, p, committed)
                still.append((p, proc, logf, t0))
                continue
            logf.close()
            _finish(p, rc, time.time() - t0)
            progress.advance(task)
            if p.status == "done":
                archive_run(sweep, p)
                acc = f"{p.accuracy:.4f}" if p.accuracy is not None else "?"
                progress.console.print(f"[green]done[/]     {escape(p.name)}  global accuracy {acc}  {p.seconds:.0f} s")
            else:
                progress.console.print(
                    f"[red]failed[/]   {escape(p.name)}  ({p.error}, {p.seconds:.0f} s): see {escape(str(p.run_dir / 'run.log'))}"
                )
            write_summary(sweep)
        running[:] = still


def describe_plan(sweep: Sweep) -> str:
    """The planned runs, one line each, for --dry-run."""
    lines = [f"{len(sweep.points)} runs from {sweep.source} into {sweep.output}:"]
    counts: dict[str, int] = {}
    for p in sweep.points:
        counts[p.action] = counts.get(p.action, 0) + 1
        what = {"run": "run   ", "resume": "resume", "skip": "skip  "}[p.action]
        cmd = " ".join(["fednano", *command(p)[3:]]) if p.action != "skip" else "(finished)"
        lines.append(f"  {what} {p.name}  {cmd}")
    lines.append("  " + ", ".join(f"{n} to {a}" for a, n in sorted(counts.items())))
    return "\n".join(lines)

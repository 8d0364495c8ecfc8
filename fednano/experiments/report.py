"""The pieces of `fednano report` (fednano/experiments/publish.py writes the files): runs read from results
folders alone, grouped and summarised, as tables and plots.

Every `results.json` under the given folders is read; only finished runs (non-empty
`final`) count, unfinished ones are listed in a note. Runs are grouped by method
(`federation.strategy`), Dirichlet α (`data.dirichlet_alpha`) and number of clients
(`data.num_clients`); the seeds of a group are its samples. Three accuracies per run
(`METRICS`): the final global test accuracy, the mean final local-test (personalised)
accuracy, and, for runs with a validation set, the global test accuracy at the best
validation round. Paired differences between methods are taken seed by seed (runs of one
seed share the partition and the test questions), with a 95 % t-interval.

The pure pieces (grouping, mean/std, intervals, bold-best, Markdown/CSV) work on results
dicts and need no run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednano.config import methods as method_registry
from fednano.experiments.results import markdown_table

DASH = "—"
METRICS = ("global", "local", "best")  # final global test, final mean local test, global test at the best validation round
# Config fields the grid varies (or that never change results); any other field that
# differs between runs is reported in a note.
GRID_FIELDS = {
    ("federation", "strategy"),
    ("data", "dirichlet_alpha"),
    ("data", "num_clients"),
    ("data", "seed"),
    ("federation", "seed"),
    ("model", "cache_dir"),
}
# Privacy fields that name a run's row (privacy_label): runs that differ in them are different rows, not a mixed table.
LABELLED = {("privacy", k) for k in ("client_dp", "dp_sgd", "target_epsilon", "noise_multiplier", "label_epsilon", "embedding_noise",
                                     "gradient_noise", "reproducible_noise")} | {("split", "label_private")}

# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    path: Path  # the run folder
    results: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config") or {}

    def _cfg(self, section: str, key: str, default: Any = None) -> Any:
        sec = self.config.get(section)
        return sec.get(key, default) if isinstance(sec, dict) else default

    @property
    def method(self) -> str:
        """The method's name, with its privacy settings when it has any (so that each level is a row of its own)."""
        base = str(self._cfg("federation", "strategy", "?"))
        label = privacy_label(self.config.get("privacy") or {}, self.config.get("split") or {})
        return f"{base} ({label})" if label else base

    @property
    def alpha(self) -> float:
        a = self._cfg("data", "dirichlet_alpha")
        return float(a) if isinstance(a, (int, float)) else math.nan

    @property
    def clients(self) -> int:
        c = self._cfg("data", "num_clients")
        return int(c) if isinstance(c, int) else 0

    @property
    def seed(self) -> Any:
        return self._cfg("data", "seed")

    @property
    def finished(self) -> bool:
        return bool(self.results.get("final"))

    @property
    def final(self) -> dict[str, Any]:
        return self.results.get("final") or {}

    @property
    def rounds(self) -> list[dict[str, Any]]:
        r = self.results.get("rounds")
        return [x for x in r if isinstance(x, dict)] if isinstance(r, list) else []


def privacy_label(p: dict[str, Any], split: dict[str, Any] | None = None) -> str:
    """A run's privacy settings in a few words ("" without any): the label-private split, DP kind and its ε target (or σ),
    label-DP ε, noise levels."""
    def eps() -> str:
        return f"ε={p['target_epsilon']:g}" if p.get("target_epsilon") else f"σ={p.get('noise_multiplier', 0):g}"

    parts = ["label-private" if (split or {}).get("label_private") else "",
             f"client DP {eps()}" if p.get("client_dp") else "", f"DP-SGD {eps()}" if p.get("dp_sgd") else "",
             f"label DP ε={p['label_epsilon']:g}" if p.get("label_epsilon") else "",
             f"text noise {p['embedding_noise']:g}" if p.get("embedding_noise") else "",
             f"gradient noise {p['gradient_noise']:g}" if p.get("gradient_noise") else "",
             "seeded noise, not private" if p.get("reproducible_noise") else ""]
    return ", ".join(x for x in parts if x)


def find_results(dirs: Iterable[Path]) -> list[Path]:
    """Every results.json under `dirs` (each a run folder or a folder of run folders), once, sorted."""
    seen: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        found = [d / "results.json"] if (d / "results.json").is_file() else []
        found += sorted(p for p in d.rglob("results.json") if p.is_file())
        for p in found:
            seen.setdefault(p.resolve(), None)
    return sorted(seen)


def load_runs(dirs: Iterable[Path]) -> tuple[list[Run], list[Run], list[str]]:
    """(finished runs, unfinished runs, problems) found under `dirs`."""
    finished, unfinished, problems = [], [], []
    for path in find_results(dirs):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            problems.append(f"{path}: not a FedNano results.json (no config)")
            continue
        run = Run(path.parent, data)
        if run.final.get("random_weights") or (data["config"].get("model") or {}).get("random_init"):
            problems.append(
                f"{path.parent}: random weights (model.random_init): its accuracy means nothing, so it is left out; "
                "its time, memory and bytes are in its results.json"
            )
            continue
        if run.finished and isinstance(run.final.get("global_accuracy"), (int, float)):
            finished.append(run)
        else:
            unfinished.append(run)
    return finished, unfinished, problems


# --------------------------------------------------------------------------- statistics


def number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mean(values: Iterable[Any]) -> float | None:
    vs = [x for x in (number(v) for v in values) if x is not None]
    return sum(vs) / len(vs) if vs else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None below two values."""
    vs = [x for x in (number(v) for v in values) if x is not None]
    if not vs:
        return None, None
    m = sum(vs) / len(vs)
    if len(vs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in vs) / (len(vs) - 1))


def best_round_accuracy(results: dict[str, Any]) -> float | None:
    """Global test accuracy at the best validation round (None for a run without a validation set)."""
    best = (results.get("final") or {}).get("best_validation")
    return number(best.get("global_accuracy")) if isinstance(best, dict) else None


def local_accuracy(results: dict[str, Any]) -> float | None:
    """Mean over clients of the final local-test accuracy (None if not recorded)."""
    ca = (results.get("final") or {}).get("client_accuracy")
    return mean(ca.values()) if isinstance(ca, dict) else None


def base_method(method: str) -> str:
    """"fednano (DP-SGD ε=8)" -> "fednano": the method a privacy variant's row belongs to."""
    return method.split(" (")[0]


def method_key(method: str) -> tuple[int, str]:
    """Rows in registry order; a method's privacy variants ("fednano (DP-SGD ε=8)") right after it."""
    base = base_method(method)
    order = tuple(method_registry())  # rows in registry order
    return (order.index(base) if base in order else len(order), method)


@dataclass
class Cell:
    """One method / α / clients group: its seeds' final accuracies, summarised."""

    method: str
    alpha: float
    clients: int
    seeds: list[Any] = field(default_factory=list)
    global_acc: list[float] = field(default_factory=list)
    local_by_run: list[float | None] = field(default_factory=list)  # aligned with `seeds`; None = not recorded
    best_by_run: list[float | None] = field(default_factory=list)  # test accuracy at the best validation round, aligned with `seeds`

    @property
    def local_acc(self) -> list[float]:
        return [v for v in self.local_by_run if v is not None]

    def by_run(self, metric: str) -> list[float | None]:
        """Each run's value of one of METRICS (None: not recorded), aligned with `seeds`."""
        runs: dict[str, list[float | None]] = {"global": list(self.global_acc), "local": self.local_by_run, "best": self.best_by_run}
        return runs[metric]

    def values(self, metric: str) -> list[float]:
        """The runs' values of one of METRICS (those recorded)."""
        return [v for v in self.by_run(metric) if v is not None]

    @property
    def n(self) -> int:
        return len(self.global_acc)

    @property
    def global_stats(self) -> tuple[float | None, float | None]:
        return mean_std(self.global_acc)

    @property
    def local_stats(self) -> tuple[float | None, float | None]:
        return mean_std(self.local_acc)

    @property
    def group(self) -> tuple[int, float]:
        return (self.clients, self.alpha)

    def by_seed(self, metric: str = "global") -> dict[str, float]:
        """Seed -> accuracy (one of METRICS); a seed run twice keeps its last run."""
        return {str(s): v for s, v in zip(self.seeds, self.by_run(metric)) if v is not None}


def summarize(runs: Iterable[Run]) -> list[Cell]:
    """Group finished runs by (method, α, clients); cells sorted by clients, α, method."""
    cells: dict[tuple[str, float, int], Cell] = {}
    for run in runs:
        key = (run.method, run.alpha, run.clients)
        cell = cells.setdefault(key, Cell(*key))
        cell.seeds.append(run.seed)
        cell.global_acc.append(float(run.final["global_accuracy"]))
        cell.local_by_run.append(local_accuracy(run.results))
        cell.best_by_run.append(best_round_accuracy(run.results))
    return sorted(cells.values(), key=lambda c: (c.clients, c.alpha, method_key(c.method)))


# --------------------------------------------------------------------------- formatting


def fmt_alpha(alpha: float) -> str:
    return f"{alpha:g}"


def column_label(alpha: float, clients: int) -> str:
    return f"α={fmt_alpha(alpha)} ({clients} clients)"


def format_cell(m: float | None, s: float | None, n: int | None = None, bold: bool = False) -> str:
    """'60.0 ± 14.1' from fractions (0.6, 0.1414); just the mean without std; '(n=3)' when n is given."""
    if m is None:
        return DASH
    text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")
    if bold:
        text = f"**{text}**"
    return text + (f" (n={n})" if n is not None else "")


def best_keys(values: dict[Any, float | None], decimals: int = 1) -> set[Any]:
    """Keys whose value, rounded as displayed (percent, `decimals`), is the highest."""
    shown = {k: round(100 * v, decimals) for k, v in values.items() if v is not None}
    if not shown:
        return set()
    top = max(shown.values())
    return {k for k, v in shown.items() if v == top}


def accuracy_table(cells: Sequence[Cell], metric: str = "global") -> str:
    """Markdown: rows = methods, columns = (α, clients) groups, best mean per column in bold.

    `metric` is 'global' (final global accuracy), 'local' (mean local-test accuracy) or 'best' (global test
    accuracy at the best validation round)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    groups = sorted({c.group for c in cells})
    methods = sorted({c.method for c in cells}, key=method_key)
    by = {(c.method, c.group): c for c in cells}

    def stats(c: Cell) -> tuple[float | None, float | None]:
        return mean_std(c.values(metric))

    def count(c: Cell) -> int:
        return len(c.values(metric))

    counts = {count(c) for c in cells if count(c) > 0}
    show_n = len(counts) > 1
    best = {g: best_keys({m: stats(by[(m, g)])[0] for m in methods if (m, g) in by}) for g in groups}
    rows = []
    for m in methods:
        row = [m]
        for g in groups:
            c = by.get((m, g))
            if c is None:
                row.append(DASH)
                continue
            mu, sd = stats(c)
            row.append(format_cell(mu, sd, count(c) if show_n and mu is not None else None, bold=m in best[g]))
        rows.append(row)
    header = ["method"] + [column_label(a, k) for k, a in groups]
    return markdown_table(header, rows)


@dataclass
class Paired:
    """`base − other` over the seeds both ran: mean, sample std, and on how many seeds base was higher."""

    mean: float | None
    std: float | None
    wins: int
    n: int

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % confidence interval of the mean difference (Student's t, n − 1 degrees of freedom); None below 2 seeds."""
        if self.mean is None or self.std is None or self.n < 2:
            return None
        from scipy.stats import t

        half = float(t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def paired_difference(base: Cell, other: Cell, metric: str = "global") -> Paired:
    """Seed-by-seed difference of two methods in one α / clients group.

    Runs of the same seed share the partition and the test questions (the NanoAdapter
    methods also their initial adapters), so the paired difference is far less noisy
    than comparing two means."""
    a, b = base.by_seed(metric), other.by_seed(metric)
    common = [s for s in a if s in b]
    diffs = [a[s] - b[s] for s in common]
    m, sd = mean_std(diffs)
    return Paired(m, sd, sum(d > 0 for d in diffs), len(diffs))


def format_paired(p: Paired) -> str:
    """'+3.5 [−1.7, +8.7] (2/3)': the mean difference in percentage points, its 95 % interval (from 2 seeds on),
    seeds where base was higher / seeds compared."""
    if p.mean is None:
        return DASH
    ci = p.interval
    text = f"{100 * p.mean:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci is not None else "")
    return f"{text} ({p.wins}/{p.n})"


def paired_table(cells: Sequence[Cell], baseline: str, metric: str = "global") -> str:
    """Markdown: rows = the other methods, columns = groups, cells = baseline minus method (points)."""
    groups = sorted({c.group for c in cells})
    by = {(c.method, c.group): c for c in cells}
    others = sorted({c.method for c in cells if c.method != baseline}, key=method_key)
    rows = []
    for m in others:
        row = [f"{baseline} − {m}"]
        for g in groups:
            base, other = by.get((baseline, g)), by.get((m, g))
            row.append(format_paired(paired_difference(base, other, metric)) if base and other else DASH)
        rows.append(row)
    return markdown_table(["difference"] + [column_label(a, k) for k, a in groups], rows)


def paired_csv(cells: Sequence[Cell], baseline: str) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["baseline", "method", "alpha", "clients", "metric", "seeds", "mean_difference", "std_difference", "ci95_low", "ci95_high",
                "baseline_higher"])
    by = {(c.method, c.group): c for c in cells}
    for c in cells:
        base = by.get((baseline, c.group))
        if c.method == baseline or base is None:
            continue
        for metric in METRICS:
            p = paired_difference(base, c, metric)
            if p.n:
                lo, hi = p.interval or (None, None)
                w.writerow([baseline, c.method, csv_num(c.alpha), c.clients, metric, p.n, csv_num(p.mean), csv_num(p.std), csv_num(lo),
                            csv_num(hi), p.wins])
    return out.getvalue()


def csv_num(v: Any) -> str:
    return "" if v is None else repr(float(v)) if isinstance(v, float) else str(v)


def table_csv(cells: Sequence[Cell]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["method", "alpha", "clients", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")])
    for c in cells:
        stats = [csv_num(v) for m in METRICS for v in mean_std(c.values(m))]
        w.writerow([c.method, csv_num(c.alpha), c.clients, c.n, *stats])
    return out.getvalue()


# --------------------------------------------------------------------------- cost


COST_COLUMNS = (
    ("client_parameters", "client parameters held"),
    ("uploaded_parameters_per_round", "uploaded parameters / client / round"),
    ("activation_bytes_per_step", "activation bytes / split step"),
    ("mib_per_round", "MiB moved / round"),
    ("server_seconds_per_round", "server LLM s / round"),
    ("client_seconds_per_round", "client s / round"),
    ("wall_seconds_per_round", "wall s / round"),
)


def run_cost(results: dict[str, Any]) -> dict[str, float | None]:
    """Per-run cost figures from one results.json; None for anything not recorded."""
    final = results.get("final") or {}
    rounds = [r for r in results.get("rounds") or [] if isinstance(r, dict)]
    bytes_ = [r.get("bytes") if isinstance(r.get("bytes"), dict) else None for r in rounds]

    act = None
    steps = [number(r.get("split_steps")) for r in rounds]
    if rounds and all(s is not None for s in steps) and sum(steps) > 0:  # type: ignore[arg-type]
        up = [number(b.get("activations_up")) if b else None for b in bytes_]
        if all(u is not None for u in up):
            act = sum(up) / sum(steps)  # type: ignore[arg-type]

    mib = mean(sum(x for x in (number(v) for v in b.values()) if x is not None) / 2**20 for b in bytes_ if b) if any(bytes_) else None
    client_s = []
    for r in rounds:
        cs = r.get("client_seconds")
        if isinstance(cs, dict) and cs:
            client_s.append(mean(cs.values()))
    return {
        "client_parameters": number(final.get("client_parameters")),
        "uploaded_parameters_per_round": number(final.get("uploaded_parameters_per_round")),
        "activation_bytes_per_step": act,
        "mib_per_round": mib,
        "server_seconds_per_round": mean(r.get("server_llm_seconds") for r in rounds),
        "client_seconds_per_round": mean(client_s),
        "wall_seconds_per_round": mean(r.get("seconds") for r in rounds),
    }


def cost_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per method (per method and clients count when runs have several), averaged over its runs."""
    runs = list(runs)
    per_clients = len({r.clients for r in runs}) > 1
    groups: dict[tuple[str, int | None], list[dict[str, float | None]]] = {}
    for r in runs:
        groups.setdefault((r.method, r.clients if per_clients else None), []).append(run_cost(r.results))
    rows = []
    for (method, clients), costs in sorted(groups.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)):
        row: dict[str, Any] = {"method": method, "clients": clients, "runs": len(costs)}
        for key, _ in COST_COLUMNS:
            row[key] = mean(c[key] for c in costs)
        rows.append(row)
    return rows


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_cost(key: str, v: float | None) -> str:
    if v is None:
        return DASH
    if key in ("client_parameters", "uploaded_parameters_per_round"):
        return f"{round(v):,}"
    if key == "activation_bytes_per_step":
        return human_bytes(v)
    if key == "mib_per_round":
        return f"{v:.2f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cost_markdown(rows: Sequence[dict[str, Any]]) -> str:
    with_clients = any(r.get("clients") is not None for r in rows)
    header = ["method"] + (["clients"] if with_clients else []) + ["runs"] + [label for _, label in COST_COLUMNS]
    body = []
    for r in rows:
        line = [r["method"]] + ([str(r["clients"])] if with_clients else []) + [str(r["runs"])]
        body.append(line + [_fmt_cost(k, r.get(k)) for k, _ in COST_COLUMNS])
    return markdown_table(header, body)


def cost_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    keys = ["method", "clients", "runs"] + [k for k, _ in COST_COLUMNS]
    w.writerow(keys)
    counts = ("client_parameters", "uploaded_parameters_per_round")
    for r in rows:
        vals = {k: r.get(k) for k in keys}
        for k in counts:  # parameter counts stay integers when every run agrees
            v = vals[k]
            if isinstance(v, float) and v.is_integer():
                vals[k] = int(v)
        w.writerow([csv_num(vals[k]) for k in keys])
    return out.getvalue()


# --------------------------------------------------------------------------- curves


def accuracy_curve(results: dict[str, Any]) -> list[float | None]:
    """[zero-shot, round 1, round 2, ...] global accuracy."""
    zs = number(results.get("zero_shot_accuracy"))
    if zs is None:
        zs = number((results.get("final") or {}).get("zero_shot_accuracy"))
    return [zs] + [number(r.get("global_accuracy")) for r in results.get("rounds") or [] if isinstance(r, dict)]


def cumulative_mib(results: dict[str, Any]) -> list[float]:
    """Cumulative MiB moved after each round (all channels, all clients)."""
    total, out = 0.0, []
    for r in results.get("rounds") or []:
        b = r.get("bytes") if isinstance(r, dict) else None
        total += sum(x for x in (number(v) for v in b.values()) if x is not None) if isinstance(b, dict) else 0.0
        out.append(total / 2**20)
    return out


def validation_curve(results: dict[str, Any]) -> list[float | None] | None:
    """[zero-shot, round 1, ...] validation accuracy (None at rounds not validated); None for a run without a validation set."""
    rounds = [r for r in results.get("rounds") or [] if isinstance(r, dict)]
    if not any(number(r.get("validation_accuracy")) is not None for r in rounds):
        return None
    return [number(results.get("zero_shot_validation_accuracy"))] + [number(r.get("validation_accuracy")) for r in rounds]


def progress_curve(results: dict[str, Any]) -> list[float | None]:
    """What a run scored round by round: its validation accuracy where it has a validation set (its test sets are
    then scored only at the end), else its global test accuracy."""
    return validation_curve(results) or accuracy_curve(results)


def first_round_at(curve: Sequence[float | None], target: float) -> int | None:
    """The first round (0 = zero-shot) whose score reaches `target`; None if none does."""
    return next((i for i, v in enumerate(curve) if v is not None and v >= target), None)


def mean_std_curve(curves: Sequence[Sequence[float | None]]) -> tuple[list[float | None], list[float]]:
    """Point-wise mean and sample std (0 below two values) over curves of possibly different lengths."""
    length = max((len(c) for c in curves), default=0)
    means, stds = [], []
    for i in range(length):
        m, s = mean_std([c[i] for c in curves if i < len(c) and c[i] is not None])  # type: ignore[misc]
        means.append(m)
        stds.append(s or 0.0)
    return means, stds


def grouped(runs: Iterable[Run]) -> dict[tuple[int, float], dict[str, list[Run]]]:
    out: dict[tuple[int, float], dict[str, list[Run]]] = {}
    for r in runs:
        out.setdefault((r.clients, r.alpha), {}).setdefault(r.method, []).append(r)
    return dict(sorted(out.items()))


def subplots(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def score_label(runs: Sequence[Run]) -> str:
    validated = {validation_curve(r.results) is not None for r in runs}
    return {frozenset({True}): "validation accuracy", frozenset({False}): "global accuracy"}.get(
        frozenset(validated), "validation (or global) accuracy")


def plot_curves(runs: Sequence[Run], path: Path) -> None:
    """Per α / clients group: each method's score per round (`progress_curve`), mean ± std over seeds."""
    from matplotlib.ticker import MaxNLocator

    groups = grouped(runs)
    plt, fig, axes = subplots(max(1, len(groups)))
    for ax, ((clients, alpha), methods) in zip(axes, groups.items()):
        for method in sorted(methods, key=method_key):
            m, s = mean_std_curve([progress_curve(r.results) for r in methods[method]])
            xs = [i for i, v in enumerate(m) if v is not None]
            ys = [m[i] for i in xs]
            lo = [m[i] - s[i] for i in xs]  # type: ignore[operator]
            hi = [m[i] + s[i] for i in xs]  # type: ignore[operator]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{method} (n={len(methods[method])})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(column_label(alpha, clients))
        ax.set_xlabel("round (0 = zero-shot)")
        ax.set_ylabel(score_label(runs))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_bytes(runs: Sequence[Run], path: Path) -> None:
    from matplotlib.ticker import FuncFormatter

    groups = grouped(runs)
    plt, fig, axes = subplots(max(1, len(groups)))
    for ax, ((clients, alpha), methods) in zip(axes, groups.items()):
        for method in sorted(methods, key=method_key):
            xs, _ = mean_std_curve([cumulative_mib(r.results) for r in methods[method]])
            ys, _ = mean_std_curve([progress_curve(r.results)[1:] for r in methods[method]])
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and x > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=method)
        ax.set_xscale("log")
        fmt = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="x", which="both", labelsize=7, labelrotation=45)
        ax.set_title(column_label(alpha, clients))
        ax.set_xlabel("cumulative MiB moved (log)")
        ax.set_ylabel(score_label(runs))
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- notes and the whole report


def _flat_config(cfg: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(s, k): json.dumps(v, sort_keys=True) for s, sec in cfg.items() if isinstance(sec, dict) for k, v in sec.items()}


def _completed(cfg: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with the fields added to FedNano since it was recorded at their defaults, as config.same_config
    counts them, so that a run older than a field does not differ from newer runs in it (unreadable: as recorded)."""
    from fednano.config import ConfigError, from_dict

    try:
        return from_dict(json.loads(json.dumps(cfg)), "recorded config").to_dict()
    except ConfigError:
        return cfg


def config_notes(runs: Sequence[Run]) -> list[str]:
    """Config fields (other than method, α, clients, seeds) that differ between the runs compared."""
    flats = [_flat_config(_completed(r.config)) for r in runs]
    values: dict[tuple[str, str], set[str]] = {}
    for flat in flats:
        for key, v in flat.items():
            values.setdefault(key, set()).add(v)
    notes = []
    for key, vs in sorted(values.items()):
        missing = any(key not in flat for flat in flats)
        if key not in GRID_FIELDS and key not in LABELLED and (len(vs) > 1 or missing):
            notes.append(
                f"runs differ in {key[0]}.{key[1]} ({', '.join(sorted(vs))}{', missing in some' if missing else ''}): the table mixes them"
            )
    return notes


def duplicate_seed_notes(cells: Sequence[Cell]) -> list[str]:
    notes = []
    for c in cells:
        dup = sorted({str(s) for s in c.seeds if c.seeds.count(s) > 1})
        if dup:
            notes.append(f"{c.method}, {column_label(c.alpha, c.clients)}: seed(s) {', '.join(dup)} appear in several runs (all counted)")
    return notes

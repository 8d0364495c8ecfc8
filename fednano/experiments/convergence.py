"""How fast each method gets there: rounds and bytes to a target accuracy, and the convergence plot.

The target of an α / clients group is a fraction (default 0.9) of a reference: the mean over seeds of
`centralized`'s best score (the upper bound), or, where the group has no centralized run, of the best
method's. Scores are what a run measured round by round (`report.progress_curve`): its validation
accuracy where it has a validation set, else its global test accuracy. A run reaches the target at
the first round whose score is at least the target (round 0 is the zero-shot model); its bytes to
target are everything moved (all channels, all clients) up to and including that round.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fednano.experiments.report import (
    DASH,
    Run,
    column_label,
    csv_num,
    cumulative_mib,
    first_round_at,
    format_cell,
    grouped,
    mean,
    mean_std,
    mean_std_curve,
    method_key,
    progress_curve,
    score_label,
    subplots,
)
from fednano.experiments.results import markdown_table

REFERENCE = "centralized"


@dataclass
class Convergence:
    """One method in one α / clients group: per run, the round and MiB at which it reached the target."""

    method: str
    alpha: float
    clients: int
    target: float
    reference: str  # what the target is a fraction of
    rounds: list[int | None] = field(default_factory=list)  # per run; None = never reached
    mib: list[float | None] = field(default_factory=list)
    best_rounds: list[int] = field(default_factory=list)  # per run, the round of its best score

    @property
    def reached(self) -> list[int]:
        return [r for r in self.rounds if r is not None]


def best_score(run: Run) -> tuple[int, float] | None:
    """(round, score) of a run's best score; the earliest round on ties."""
    pts = [(i, v) for i, v in enumerate(progress_curve(run.results)) if v is not None]
    return max(pts, key=lambda p: (p[1], -p[0])) if pts else None


def group_target(methods: dict[str, list[Run]], fraction: float) -> tuple[float, str] | None:
    """(target, what it is a fraction of) for one group."""
    best = {m: mean(b[1] for b in map(best_score, runs) if b) for m, runs in methods.items()}
    if best.get(REFERENCE) is not None:
        return fraction * best[REFERENCE], f"{fraction:g} × {REFERENCE}'s best ({100 * best[REFERENCE]:.1f})"  # type: ignore[operator]
    known = {m: v for m, v in best.items() if v is not None}
    if not known:
        return None
    top = max(known, key=lambda m: known[m])
    return fraction * known[top], f"{fraction:g} × the best method's best ({top}, {100 * known[top]:.1f}; no {REFERENCE} run)"


def convergence(runs: Sequence[Run], fraction: float = 0.9) -> list[Convergence]:
    """Rounds and MiB to the target, per method and group (groups by clients, α; methods in registry order)."""
    out = []
    for (clients, alpha), methods in grouped(runs).items():
        target = group_target(methods, fraction)
        if target is None:
            continue
        for method in sorted(methods, key=method_key):
            c = Convergence(method, alpha, clients, *target)
            for run in methods[method]:
                rnd = first_round_at(progress_curve(run.results), c.target)
                mib = cumulative_mib(run.results)
                c.rounds.append(rnd)
                c.mib.append(None if rnd is None else 0.0 if rnd == 0 else mib[rnd - 1])
                best = best_score(run)
                if best:
                    c.best_rounds.append(best[0])
            out.append(c)
    return out


def _rounds_text(values: Sequence[float], total: int) -> str:
    m, s = mean_std(values)
    if m is None:
        return f"never (0/{total})"
    return (f"{m:.1f}" + (f" ± {s:.1f}" if s is not None else "")) + f" ({len(values)}/{total})"


def convergence_markdown(rows: Sequence[Convergence]) -> str:
    body = []
    for c in rows:
        mib = [m for m in c.mib if m is not None]
        body.append([c.method, column_label(c.alpha, c.clients), format_cell(c.target, None), _rounds_text(c.reached, len(c.rounds)),
                     f"{mean(mib):.1f}" if mib else DASH, _rounds_text(c.best_rounds, len(c.rounds)).split(" (")[0]])
    refs = {column_label(c.alpha, c.clients): c.reference for c in rows}
    return markdown_table(["method", "group", "target (%)", "rounds to target (runs that reached it)", "MiB to target",
                           "round of the best score"], body) + "".join(f"\n\nTarget, {g}: {r}." for g, r in refs.items())


def convergence_csv(rows: Sequence[Convergence]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["method", "alpha", "clients", "target", "reference", "runs", "reached", "rounds_mean", "rounds_std", "mib_mean",
                "best_round_mean"])
    for c in rows:
        m, s = mean_std(c.reached)
        w.writerow([c.method, csv_num(c.alpha), c.clients, csv_num(c.target), c.reference, len(c.rounds), len(c.reached), csv_num(m),
                    csv_num(s), csv_num(mean(c.mib)), csv_num(mean(c.best_rounds))])
    return out.getvalue()


def plot_convergence(runs: Sequence[Run], rows: Sequence[Convergence], path: Path) -> None:
    """Per group, two panels: score per round and score per cumulative MiB, mean ± std over seeds, the target dashed."""
    from matplotlib.ticker import MaxNLocator

    groups = grouped(runs)
    targets = {(c.clients, c.alpha): c.target for c in rows}
    plt, fig, axes = subplots(2 * max(1, len(groups)))
    for i, ((clients, alpha), methods) in enumerate(groups.items()):
        by_round, by_bytes = axes[2 * i], axes[2 * i + 1]
        for method in sorted(methods, key=method_key):
            m, s = mean_std_curve([progress_curve(r.results) for r in methods[method]])
            x_mib = [0.0] + [v or 0.0 for v in mean_std_curve([cumulative_mib(r.results) for r in methods[method]])[0]]
            idx = [j for j, v in enumerate(m) if v is not None]
            ys = [m[j] for j in idx]
            lo, hi = [m[j] - s[j] for j in idx], [m[j] + s[j] for j in idx]  # type: ignore[operator]
            for ax, xs in ((by_round, idx), (by_bytes, [x_mib[j] for j in idx if j < len(x_mib)])):
                (line,) = ax.plot(xs, ys[: len(xs)], marker="o", ms=3, label=f"{method} (n={len(methods[method])})")
                ax.fill_between(xs, lo[: len(xs)], hi[: len(xs)], color=line.get_color(), alpha=0.15, linewidth=0)
        for ax, xlabel in ((by_round, "round (0 = zero-shot)"), (by_bytes, "cumulative MiB moved")):
            if (clients, alpha) in targets:
                ax.axhline(targets[(clients, alpha)], color="grey", ls="--", lw=1, label="target")
            ax.set(title=column_label(alpha, clients), xlabel=xlabel, ylabel=score_label(runs))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        by_round.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flattened_round(points: Sequence[tuple[int, float]], window: int = 10, tolerance: float = 0.01) -> int | None:
    """When a validation curve has flattened: the first validated round r such that no score in rounds r+1 … r+window
    is more than `tolerance` above the best score up to r (configs/sweeps/convergence.toml's rule for its rounds).
    `points`: (round, score) in round order. None if no r passes with `window` rounds scored after it."""
    last = points[-1][0] if points else 0
    for r, _ in points:
        if r + window > last:
            return None
        best = max(v for q, v in points if q <= r)
        if all(v <= best + tolerance for q, v in points if r < q <= r + window):
            return r
    return None

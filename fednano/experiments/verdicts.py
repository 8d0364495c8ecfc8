"""The claims `fednano report` decides from paired seeds (`verdicts.md` / `.csv`), each by one rule stated before the runs.

A claim compares two methods in one α / clients group, seed by seed (report.paired_difference: the same
seed is the same partition and test questions). With the 95 % t-interval [lo, hi] of `method − other`:

    refuted        hi < 0              method is lower, beyond the seeds' noise
    holds          lo > −margin        margin 0: method is higher; margin > 0: not lower by more than the margin
    inconclusive   otherwise           the seeds cannot tell (the interval says how large a difference is left open)
    too few seeds  fewer than MIN_SEEDS (3) paired seeds

The margin of a "≥" claim (MARGIN, 2 points) and the claims were fixed on 2026-12-03, before the
convergence sweep's verdict-bearing seeds had run. MIN_SEEDS was raised from 2 to 3 the same day, when the
pair's first two seeds happened to differ by exactly the same 2.4 points: a zero-width 2-seed interval
"refuted" the claim, which two seeds cannot do (the issue asks for 3 seeds at least, 5 for this pair).
Each verdict is given for the test accuracy at each run's best validation round (the early-stopped
result; the primary one) and at the last round.
For a variant claimed to close part of the gap to centralized, the share of the gap it closes,
mean(variant − fednano) / mean(centralized − fednano) over the seeds all three ran, is given too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from fednano.experiments.report import DASH, Cell, Paired, column_label, csv_num, format_paired, mean, paired_difference
from fednano.experiments.results import markdown_table

MARGIN = 0.02  # a "≥" claim holds when the interval's lower end is above −2 points
MIN_SEEDS = 3  # fewer paired seeds decide nothing
VERDICT_METRICS = (("best", "at the best validation round"), ("global", "at the last round"))


@dataclass(frozen=True)
class Claim:
    text: str
    method: str
    other: str
    margin: float = 0.0  # 0: "method > other"; > 0: "method ≥ other", up to this margin (a fraction)
    gap_to: str | None = None  # the upper bound whose gap to `other` the method may close (centralized)

    def decide(self, p: Paired) -> str:
        ci = p.interval
        if ci is None or p.n < MIN_SEEDS:
            return "too few seeds"
        lo, hi = ci
        if hi < 0:
            return "refuted"
        return "holds" if lo > -self.margin else "inconclusive"


CLAIMS = (
    Claim("FedNano ≥ FedAvg (the paper: Fisher merging helps most at α = 0.1)", "fednano", "fedavg", MARGIN),
    Claim("FedNano > FedAvg (Fisher merging helps)", "fednano", "fedavg"),
    Claim("FedNano > FedProx", "fednano", "fedprox"),
    Claim("FedNano > FedIT (LoRA in the LLM, whole model on the client)", "fednano", "fedit-lora"),
    Claim("fednano-product > FedNano (closes part of the gap to centralized)", "fednano-product", "fednano", gap_to="centralized"),
    Claim("fednano-ffa > FedNano (closes part of the gap to centralized)", "fednano-ffa", "fednano", gap_to="centralized"),
)


@dataclass
class Verdict:
    claim: Claim
    group: tuple[int, float]  # (clients, α)
    metric: str
    paired: Paired
    verdict: str
    gap_closed: float | None  # share of the gap to claim.gap_to closed (None: not asked or not measurable)


def gap_closed(variant: Cell, base: Cell, top: Cell | None, metric: str) -> float | None:
    """mean(variant − base) / mean(top − base) over the seeds all three ran; None without a positive gap."""
    if top is None:
        return None
    v, b, t = (c.by_seed(metric) for c in (variant, base, top))
    seeds = [s for s in v if s in b and s in t]
    gap = mean(t[s] - b[s] for s in seeds)
    if gap is None or gap <= 0:
        return None
    gain = mean(v[s] - b[s] for s in seeds)
    return None if gain is None else gain / gap


def verdicts(cells: Sequence[Cell], claims: Sequence[Claim] = CLAIMS) -> list[Verdict]:
    """Every claim, in every group where both of its methods ran, for both VERDICT_METRICS."""
    by = {(c.method, c.group): c for c in cells}
    out = []
    for claim in claims:
        for group in sorted({c.group for c in cells}):
            a, b = by.get((claim.method, group)), by.get((claim.other, group))
            if a is None or b is None:
                continue
            for metric, _ in VERDICT_METRICS:
                p = paired_difference(a, b, metric)
                if not p.n:
                    continue
                top = by.get((claim.gap_to, group)) if claim.gap_to else None
                out.append(Verdict(claim, group, metric, p, claim.decide(p), gap_closed(a, b, top, metric)))
    return out


def verdicts_markdown(rows: Sequence[Verdict]) -> str:
    labels = dict(VERDICT_METRICS)
    body = [
        [r.claim.text, column_label(r.group[1], r.group[0]), labels[r.metric], format_paired(r.paired),
         DASH if r.gap_closed is None else f"{100 * r.gap_closed:.0f} %", f"**{r.verdict}**"]
        for r in rows
    ]
    return markdown_table(["claim", "setting", "test accuracy", "difference (points) [95 %] (seeds higher / seeds)",
                           "gap to centralized closed", "verdict"], body, ["---", "---", "---", "---:", "---:", "---"])


def verdicts_csv(rows: Sequence[Verdict]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["claim", "method", "other", "clients", "alpha", "metric", "seeds", "mean_difference", "ci95_low", "ci95_high", "margin",
                "gap_closed", "verdict"])
    for r in rows:
        lo, hi = r.paired.interval or (None, None)
        w.writerow([r.claim.text, r.claim.method, r.claim.other, r.group[0], csv_num(r.group[1]), r.metric, r.paired.n,
                    csv_num(r.paired.mean), csv_num(lo), csv_num(hi), csv_num(r.claim.margin), csv_num(r.gap_closed), r.verdict])
    return out.getvalue()


VERDICT_LEGEND = (
    "Each claim's rule, fixed before the verdict-bearing runs (fednano/experiments/verdicts.py): with the 95 % t-interval "
    f"[lo, hi] of the paired difference over at least {MIN_SEEDS} seeds, **refuted** if hi < 0, **holds** if lo > −margin "
    f"(0 for \">\", {100 * MARGIN:g} points for \"≥\"), else **inconclusive**. The best-validation-round accuracy (each run "
    "early-stopped on validation data) is the primary result. Gap closed: mean(variant − fednano) / mean(centralized − "
    "fednano) over the seeds all three ran."
)

"""`fednano report`'s privacy table: for each method and privacy setting, what the server read and what the setting cost.

One row per (method with its privacy label, α, clients) group, from results folders alone:

- what the server read at the run's last audited round (`privacy.audit`, the `leakage` of a round): the share of
  text tokens recovered by the nearest-row attack, of answer tokens read (in the clear, or by the gradient attack
  under `split.label_private`) and of images retrieved top-1; mean over the group's runs;
- the (ε, δ) spent by the end under client-level DP or DP-SGD (the last round's `dp_epsilon`; DP-SGD: the
  client that spent most), mean over runs;
- the final global accuracy (mean ± std over seeds) and its paired difference to the same method without any
  privacy setting, seed by seed with a 95 % interval (report.paired_difference);
- MiB moved per round and wall seconds per round (report.run_cost).

Pure functions of results dicts; publish.py writes `privacy.md` and `privacy.csv` when a run has a privacy
setting or an audit.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from fednano.experiments.report import (
    DASH,
    Cell,
    Run,
    base_method,
    column_label,
    csv_num,
    format_cell,
    format_paired,
    mean,
    mean_std,
    method_key,
    number,
    paired_difference,
    privacy_label,
    run_cost,
    summarize,
)
from fednano.experiments.results import markdown_table

LEAKS = (("text_tokens_recovered", "text tokens read"), ("answer_tokens_in_clear", "answer tokens read"),
         ("image_top1", "images retrieved"))


def last_leakage(results: dict[str, Any]) -> dict[str, Any] | None:
    """The leakage the audit measured at the run's last audited round (None: the run had no audit)."""
    audited = [r["leakage"] for r in results.get("rounds") or [] if isinstance(r, dict) and isinstance(r.get("leakage"), dict)]
    return audited[-1] if audited else None


def spent_epsilon(results: dict[str, Any]) -> float | None:
    """The ε a run had spent by its last round under client-level DP or DP-SGD (None: neither)."""
    eps = [number(r.get("dp_epsilon")) for r in results.get("rounds") or [] if isinstance(r, dict)]
    spent = [e for e in eps if e is not None]
    return spent[-1] if spent else None


def has_privacy(run: Run) -> bool:
    """A run with a privacy setting (its row is labelled) or an audit."""
    return " (" in run.method or last_leakage(run.results) is not None


def privacy_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per method / privacy setting / α / clients group, for the groups that have a privacy setting or an
    audit, and the plain methods they are paired against. Empty when no run has either."""
    runs = list(runs)
    if not any(has_privacy(r) for r in runs):
        return []
    cells = {(c.method, c.group): c for c in summarize(runs)}
    wanted = {(r.method, (r.clients, r.alpha)) for r in runs if has_privacy(r)}
    wanted |= {(base_method(m), g) for m, g in wanted if (base_method(m), g) in cells}
    rows = []
    for method, group in sorted(wanted, key=lambda k: (k[1], method_key(k[0]))):
        cell = cells[(method, group)]
        members = [r for r in runs if r.method == method and (r.clients, r.alpha) == group]
        rows.append(_row(cell, members, cells.get((base_method(method), group))))
    return rows


def _row(cell: Cell, members: Sequence[Run], plain: Cell | None) -> dict[str, Any]:
    leaks = [last_leakage(r.results) for r in members]
    costs = [run_cost(r.results) for r in members]
    acc, sd = mean_std(cell.global_acc)
    row: dict[str, Any] = {"method": cell.method, "alpha": cell.alpha, "clients": cell.clients, "runs": cell.n,
                           "audited": sum(v is not None for v in leaks)}
    for key, _ in LEAKS:
        row[key] = mean(v.get(key) for v in leaks if v is not None)
    row["epsilon"] = mean(spent_epsilon(r.results) for r in members)
    row["accuracy"], row["accuracy_std"] = acc, sd
    row["paired"] = paired_difference(plain, cell) if plain is not None and plain is not cell else None
    row["mib_per_round"] = mean(c["mib_per_round"] for c in costs)
    row["wall_seconds_per_round"] = mean(c["wall_seconds_per_round"] for c in costs)
    return row


def _share(v: float | None) -> str:
    return DASH if v is None else f"{v:.3f}"


def privacy_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table: one row per group; leakage as shares (— without an audit), Δ = plain minus this row, in points."""
    groups = {(r["clients"], r["alpha"]) for r in rows}
    header = ["method"] + (["setting"] if len(groups) > 1 else []) + ["runs"] + [label for _, label in LEAKS] + [
        "ε spent", "global accuracy (%)", "plain − this (points)", "MiB / round", "wall s / round"]
    body = []
    for r in rows:
        p = r["paired"]
        body.append([r["method"]] + ([column_label(r["alpha"], r["clients"])] if len(groups) > 1 else []) + [str(r["runs"])]
                    + [_share(r[k]) for k, _ in LEAKS]
                    + [DASH if r["epsilon"] is None else f"{r['epsilon']:.2f}", format_cell(r["accuracy"], r["accuracy_std"]),
                       format_paired(p) if p is not None else DASH,
                       DASH if r["mib_per_round"] is None else f"{r['mib_per_round']:.2f}",
                       DASH if r["wall_seconds_per_round"] is None else f"{r['wall_seconds_per_round']:.0f}"])
    return markdown_table(header, body)


def privacy_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    keys = ["method", "alpha", "clients", "runs", "audited", *(k for k, _ in LEAKS), "epsilon", "accuracy", "accuracy_std"]
    w.writerow([*keys, "plain_minus_this", "plain_minus_this_low", "plain_minus_this_high", "paired_seeds",
                "mib_per_round", "wall_seconds_per_round"])
    for r in rows:
        p = r["paired"]
        ci = p.interval if p is not None else None
        w.writerow([csv_num(r[k]) for k in keys]
                   + [csv_num(p.mean if p else None), csv_num(ci[0] if ci else None), csv_num(ci[1] if ci else None),
                      p.n if p else "", csv_num(r["mib_per_round"]), csv_num(r["wall_seconds_per_round"])])
    return out.getvalue()


# --------------------------------------------------------------------------- accuracy against ε (the DP tables)

DP_KINDS = (("client_dp", "client-level DP"), ("dp_sgd", "sample-level DP-SGD"))


def dp_level(run: Run) -> tuple[str, float] | None:
    """(DP kind, target ε) of a run whose only privacy setting is client-level DP or DP-SGD with a target ε; ("", ∞) for a
    run without any privacy setting (the ε = ∞ row of every kind); None for anything else (other privacy settings, or
    DP by a noise multiplier without a target ε: see privacy.md)."""
    if " (" not in run.method:
        return "", math.inf
    p = run.config.get("privacy") or {}
    for kind, _ in DP_KINDS:
        eps = number(p.get("target_epsilon"))
        alone = {kind: True, "target_epsilon": p.get("target_epsilon")}
        if p.get(kind) and eps and run.method == f"{base_method(run.method)} ({privacy_label(alone)})":
            return kind, eps
    return None


def dp_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per DP kind, α / clients group, ε level (∞: the same methods without privacy) and method: the runs' Cell (final global
    accuracy by seed) and the mean ε they spent. Empty when no run has client-level DP or DP-SGD at a target ε."""
    tagged = [(r, level[0], level[1]) for r in runs if (level := dp_level(r)) is not None]
    private = {(kind, (r.clients, r.alpha)) for r, kind, _ in tagged if kind}
    order = [k for k, _ in DP_KINDS]
    rows = []
    for kind, group in sorted(private, key=lambda k: (order.index(k[0]), k[1])):
        here = [(r, eps) for r, k, eps in tagged if k in ("", kind) and (r.clients, r.alpha) == group]
        methods = {base_method(r.method) for r, k, _ in tagged if k == kind and (r.clients, r.alpha) == group}
        for eps in sorted({e for _, e in here}):
            same = [r for r, e in here if e == eps and base_method(r.method) in methods]
            for cell in summarize(same):
                rows.append({"kind": kind, "clients": group[0], "alpha": group[1], "epsilon": eps, "method": base_method(cell.method),
                             "cell": cell, "spent": mean(spent_epsilon(r.results) for r in same if r.method == cell.method)})
    return rows


def _dp_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return DASH
    cell = row["cell"]
    text = format_cell(*mean_std(cell.global_acc), cell.n)
    return text + (f", ε spent {row['spent']:.2f}" if row["spent"] is not None else "")


def dp_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table per DP kind and α / clients group: rows = target ε (then ∞, no DP), columns = methods side by side (final
    global accuracy %, mean ± std over seeds, n = seeds, the ε spent), then the first method minus each other, seed by seed."""
    labels = dict(DP_KINDS)
    out = []
    for kind, clients, alpha in dict.fromkeys((r["kind"], r["clients"], r["alpha"]) for r in rows):
        block = [r for r in rows if (r["kind"], r["clients"], r["alpha"]) == (kind, clients, alpha)]
        methods = sorted({r["method"] for r in block}, key=method_key)
        at = {(r["epsilon"], r["method"]): r for r in block}
        body = []
        for eps in sorted({r["epsilon"] for r in block}):
            line = ["∞ (no DP)" if math.isinf(eps) else f"{eps:g}"] + [_dp_cell(at.get((eps, m))) for m in methods]
            for m in methods[1:]:
                a, b = at.get((eps, methods[0])), at.get((eps, m))
                line.append(format_paired(paired_difference(a["cell"], b["cell"])) if a and b else DASH)
            body.append(line)
        header = ["target ε"] + [f"{m} (%)" for m in methods] + [f"{methods[0]} − {m} (points)" for m in methods[1:]]
        out.append(f"**{labels[kind]}, {column_label(alpha, clients)}**\n\n{markdown_table(header, body)}")
    return "\n\n".join(out)


def dp_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["kind", "alpha", "clients", "target_epsilon", "method", "seeds", "accuracy_mean", "accuracy_std", "epsilon_spent"])
    for r in rows:
        m, sd = mean_std(r["cell"].global_acc)
        w.writerow([r["kind"], csv_num(r["alpha"]), r["clients"], "inf" if math.isinf(r["epsilon"]) else csv_num(r["epsilon"]),
                    r["method"], r["cell"].n, csv_num(m), csv_num(sd), csv_num(r["spent"])])
    return out.getvalue()

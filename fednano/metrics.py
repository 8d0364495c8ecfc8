"""Accuracy overall and per category (pure functions), flattened for Flower MetricRecords.

Keys: "accuracy", "num_examples", and per category value "acc/<key>=<value>" with
its count "n/<key>=<value>" so that per-client reports can be merged by weight. Generated answers'
scores (data.scoring = "generate"), where present: "generated_accuracy" and "gen_acc/<key>=<value>"
(same counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fednano.data.samples import Sample

GENERATED = "generated_accuracy"


def accuracy_report(samples: Sequence[Sample], correct: Sequence[bool], categories: Sequence[str] = ()) -> dict[str, float]:
    if len(samples) != len(correct):
        raise ValueError("one correctness flag per sample")
    out: dict[str, float] = {"accuracy": sum(correct) / len(correct) if correct else 0.0, "num_examples": float(len(correct))}
    for key in categories:
        groups: dict[str, list[bool]] = {}
        for s, c in zip(samples, correct, strict=True):
            for value in filter(None, s.get(key).split("|")):  # "TXT|IMG": the sample counts in both
                groups.setdefault(value, []).append(c)
        for value, flags in sorted(groups.items()):
            out[f"acc/{key}={value}"] = sum(flags) / len(flags)
            out[f"n/{key}={value}"] = float(len(flags))
    return out


def generated_report(samples: Sequence[Sample], correct: Sequence[bool], categories: Sequence[str] = ()) -> dict[str, float]:
    """accuracy_report's numbers for generated answers, under their own keys: generated_accuracy, gen_acc/..."""
    rep = accuracy_report(samples, correct, categories)
    return {GENERATED: rep["accuracy"], **{"gen_" + k: v for k, v in rep.items() if k.startswith("acc/")}}


def merge_reports(reports: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Weighted merge of several clients' reports (overall and per category, closed-set and generated)."""
    out: dict[str, float] = {}
    total = sum(r["num_examples"] for r in reports)
    if total:
        out["accuracy"] = sum(r["accuracy"] * r["num_examples"] for r in reports) / total
        out["num_examples"] = total
        if all(GENERATED in r for r in reports):
            out[GENERATED] = sum(r[GENERATED] * r["num_examples"] for r in reports) / total
    cats = {k[len("acc/") :] for r in reports for k in r if k.startswith("acc/")}
    for c in sorted(cats):
        n = sum(r.get(f"n/{c}", 0.0) for r in reports)
        if n:
            out[f"n/{c}"] = n
            for acc in ("acc/", "gen_acc/"):
                if any(f"{acc}{c}" in r for r in reports):
                    out[f"{acc}{c}"] = sum(r.get(f"{acc}{c}", 0.0) * r.get(f"n/{c}", 0.0) for r in reports) / n
    return out


def by_category(report: Mapping[str, float], prefix: str = "acc/") -> dict[str, float]:
    """{"subject=NAT": 0.8, ...} from a flat report (prefix "gen_acc/": the generated answers')."""
    return {k[len(prefix) :]: v for k, v in report.items() if k.startswith(prefix)}

"""`fednano report`: paper-style tables and plots from results folders alone, written to one folder.

- `table.md`: final global accuracy, mean local-test (personalised) accuracy and, for runs with a
  validation set, the global test accuracy at the best validation round; in percent, mean ± sample
  std (ddof=1) over seeds; rows = methods, columns = α and clients; the best mean of each column in
  bold. Then the paired differences against a baseline (default `fednano`), seed by seed, with
  their 95 % interval, and the rounds and bytes each method needed to reach the target.
- `table.csv`: one row per method/α/clients group: `method, alpha, clients, seeds` (finished runs),
  then mean and std of each metric (`global`, `local`, `best`) as fractions in [0, 1].
- `paired.csv`: each method against the baseline, per metric: seeds, mean and std of the difference,
  its 95 % interval, seeds where the baseline was higher.
- `convergence.md` / `.csv` and `convergence.png`: rounds and MiB to the target accuracy (a fraction of
  centralized's best; fednano/experiments/convergence.py), and the score per round and per MiB with bands.
- `curves.png`: each method's score per round (validation accuracy where the runs have a validation
  set, else global accuracy; round 0 = zero-shot), mean ± std over seeds.
- `accuracy_vs_bytes.png`: the same score against the cumulative MiB moved (log scale).
- `cost.md` / `cost.csv`: per method, what a client holds, what it uploads, split traffic per step,
  MiB per round and server / client / wall time per round ("—" / empty: not recorded).
- `privacy.md` / `privacy.csv` (when a run has a privacy setting or an audit): per method and privacy setting,
  what the server read at the last audited round, the ε spent, the accuracy and its paired cost against the
  plain method, MiB and seconds per round (fednano/experiments/privacy_report.py).
- `dp.md` / `dp.csv` (when runs have client-level DP or DP-SGD at a target ε): accuracy against ε, one table per DP kind,
  the methods side by side with their paired difference, the runs without privacy as ε = ∞.
- `verdicts.md` / `.csv` (when both methods of a claim ran): each claim of the comparison (FedNano ≥ FedAvg, the
  variants closing the gap to centralized, ...) decided from the paired 95 % interval by a rule fixed in advance
  (fednano/experiments/verdicts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fednano.experiments.convergence import convergence, convergence_csv, convergence_markdown, plot_convergence
from fednano.experiments.privacy_report import dp_csv, dp_markdown, dp_rows, privacy_csv, privacy_markdown, privacy_rows
from fednano.experiments.report import (
    Cell,
    Run,
    accuracy_table,
    config_notes,
    cost_csv,
    cost_markdown,
    cost_rows,
    duplicate_seed_notes,
    load_runs,
    paired_csv,
    paired_table,
    plot_accuracy_vs_bytes,
    plot_curves,
    summarize,
    table_csv,
)
from fednano.experiments.verdicts import VERDICT_LEGEND as LEGEND
from fednano.experiments.verdicts import verdicts, verdicts_csv, verdicts_markdown

PRIVACY_LEGEND = (
    "Leakage: shares the server recovered at the last audited round (privacy.audit; mean over runs; — without an audit): "
    "text tokens by the nearest embedding row, answer tokens in the clear or by the gradient attack (label-private), "
    "images by top-1 retrieval. ε spent: (ε, δ = privacy.delta) after the last round (DP-SGD: the client that spent "
    "most). plain − this: the same method without privacy settings minus this row, seed by seed, mean [95 % interval] "
    "(seeds where plain was higher / seeds compared)."
)

DP_LEGEND = (
    "Final global test accuracy, mean ± std over seeds (n = seeds), and the ε the runs spent at δ = privacy.delta (DP-SGD: the "
    "client that spent most); ∞: the same methods without any privacy setting. The last columns: the first method minus "
    "each other one, seed by seed, mean [95 % interval] (seeds where the first was higher / seeds compared)."
)


@dataclass
class Report:
    global_table: str
    local_table: str
    best_table: str  # empty when no run has a validation set
    cost_table: str
    paired_table: str  # empty when the baseline method has no finished run
    convergence_table: str
    notes: list[str]
    files: list[Path]


def _table_md(rep: Report, baseline: str, n_runs: int, target: float) -> str:
    """table.md: the accuracy tables, the paired tables where there are some, convergence, and the notes."""
    note_md = "".join(f"- {n}\n" for n in rep.notes)
    best = (f"## Global test accuracy (%) at the best validation round, mean ± std over seeds\n\n{rep.best_table}\n\n"
            if rep.best_table else "")
    paired = (
        f"\n## Paired differences (points): {baseline} minus each method\n\n{rep.paired_table}\n\n"
        f"Over the seeds both methods ran (same seed = same partition and test questions): the mean per-seed difference, "
        f"its 95 % interval (Student's t; from 2 seeds on), and (seeds where {baseline} was higher / seeds compared).\n"
    ) if rep.paired_table else ""
    return (
        f"## Final global accuracy (%), mean ± std over seeds\n\n{rep.global_table}\n\n{best}"
        f"## Mean local-test (personalised) accuracy (%), mean ± std over seeds\n\n{rep.local_table}\n\n"
        f"{n_runs} finished runs; best mean per column in bold; std is the sample std (ddof=1).\n"
        + paired
        + f"\n## Rounds and bytes to {target:g} of the reference's best score\n\n{rep.convergence_table}\n"
        + (f"\nNotes:\n\n{note_md}" if rep.notes else "")
    )


def _paired_tables(cells, baseline: str) -> str:
    """The paired differences: final global accuracy, and the best validation round's where runs have one."""
    out = [f"Final global accuracy:\n\n{paired_table(cells, baseline, 'global')}"]
    if any(c.values("best") for c in cells):
        out.append(f"Global test accuracy at the best validation round:\n\n{paired_table(cells, baseline, 'best')}")
    return "\n\n".join(out)


def _where_they_apply(finished: Sequence[Run], cells: Sequence[Cell]) -> dict[str, str]:
    """The files only some runs call for: privacy.md/.csv (a privacy setting or an audit), dp.md/.csv (DP at a target ε),
    verdicts.md/.csv (both methods of a claim)."""
    texts = {}
    private = privacy_rows(finished)
    if private:
        texts["privacy.md"] = (f"## What the server read, and what each privacy setting cost\n\n{privacy_markdown(private)}\n\n"
                               f"{PRIVACY_LEGEND}\n")
        texts["privacy.csv"] = privacy_csv(private)
    dp = dp_rows(finished)
    if dp:
        texts["dp.md"] = f"## Accuracy against ε: the methods side by side\n\n{dp_markdown(dp)}\n\n{DP_LEGEND}\n"
        texts["dp.csv"] = dp_csv(dp)
    decided = verdicts(cells)
    if decided:
        texts["verdicts.md"] = f"## The comparison's claims, decided from paired seeds\n\n{verdicts_markdown(decided)}\n\n{LEGEND}\n"
        texts["verdicts.csv"] = verdicts_csv(decided)
    return texts


def build_report(dirs: Sequence[Path], out: Path, baseline: str = "fednano", target: float = 0.9) -> Report:
    """Read every run under `dirs` and write the tables and plots to `out`. Raises ValueError without finished runs.

    `baseline` is the method every other one is compared with seed by seed (paired tables); `target` the
    fraction of the reference's best score that convergence counts rounds and bytes to."""
    finished, unfinished, problems = load_runs(dirs)
    if not finished:
        raise ValueError(
            f"no finished runs (results.json with a non-empty 'final') under {', '.join(map(str, dirs))}"
            + "".join(f"; {p}" for p in problems)
        )
    cells = summarize(finished)
    notes = list(problems)
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished run(s) left out: " + ", ".join(str(r.path) for r in unfinished))
    notes += config_notes(finished) + duplicate_seed_notes(cells)
    has_base = any(c.method == baseline for c in cells)
    if not has_base:
        notes.append(f"no finished run of the baseline method {baseline!r}: no paired table")
    conv = convergence(finished, target)
    rep = Report(accuracy_table(cells, "global"), accuracy_table(cells, "local"),
                 accuracy_table(cells, "best") if any(c.values("best") for c in cells) else "", cost_markdown(cost_rows(finished)),
                 _paired_tables(cells, baseline) if has_base else "", convergence_markdown(conv), notes, [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"table.md": _table_md(rep, baseline, len(finished), target), "table.csv": table_csv(cells),
             "cost.md": f'## Cost per method (mean over finished runs)\n\n{rep.cost_table}\n\n"—": not recorded by these runs.\n',
             "cost.csv": cost_csv(cost_rows(finished)), "convergence.md": rep.convergence_table + "\n",
             "convergence.csv": convergence_csv(conv)}
    if has_base:
        texts["paired.csv"] = paired_csv(cells, baseline)
    texts |= _where_they_apply(finished, cells)
    for name, text in texts.items():
        (out / name).write_text(text)
    plots = {"curves.png": plot_curves, "accuracy_vs_bytes.png": plot_accuracy_vs_bytes}
    for name, plot in plots.items():
        plot(finished, out / name)
    plot_convergence(finished, conv, out / "convergence.png")
    rep.files = [out / n for n in [*texts, *plots, "convergence.png"]]
    return rep

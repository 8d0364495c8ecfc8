"""Issue #37's protocol, applied by code, so that no step between the runs and the verdict is a choice made by hand.

    python benchmarks/merge_protocol.py screen  [--write]   # scores by merge.toml's rule; --write: merge-confirm.toml
    python benchmarks/merge_protocol.py confirm             # the chosen candidate against fedavg on the fresh seeds
    python benchmarks/merge_protocol.py default             # the same pair at make run's setting (alpha = 1)
    python benchmarks/merge_protocol.py stability ARCHIVE...  # how far each variant's validation curves fall and swing

`screen` reads the screening runs (configs/sweeps/merge.toml: every `screen-*` variant at seeds 0, 1 and 2, from its
archive benchmarks/runs/merge) and the reference `fednano-ffa` (its first 16 rounds in the convergence archive), scores
each candidate by the rule merge.toml fixed before its runs:

    score     the mean over seeds 0, 1, 2 of the mean validation accuracy at the validated rounds 12, 14 and 16
    choice    the highest score; a candidate within 0.5 points of it that moves fewer bytes (rounds 1 to 16, mean over
              the seeds) wins the tie. Test accuracy plays no part.

and, with --write, writes configs/sweeps/merge-confirm.toml (the candidate and fedavg at seeds 5 to 9, 24 rounds) and
configs/sweeps/merge-default.toml (both at make run's setting, seeds 0 to 2). A candidate missing a seed is reported,
and nothing is written until every candidate has all three.

`confirm` reads the confirmation's archive (benchmarks/runs/merge-confirm) and decides, by
fednano/experiments/verdicts.py's rule (fixed before the convergence sweep), "candidate ≥ fedavg" on the test accuracy
at the best validation round and at round 24; it reports the issue's goals beside it: the interval's lower bound above
0, the share of fedavg's gap to centralized closed (where centralized ran at the same seeds), and how far each
validation curve falls back after its best. The paper's fednano, where it ran at the same seeds, is reported beside
them (its difference to fedavg and to the candidate), outside the verdict.

`default` reads benchmarks/runs/merge-default (configs/sweeps/merge-default.toml: the candidate and fedavg at make
run's alpha = 1, 3 rounds, seeds 0 to 2) and decides "candidate ≥ fedavg" by the same rule on the final global test
accuracy (make run validates nothing), with the clients' own test splits beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fednano.experiments.report import (  # noqa: E402
    Cell,
    Paired,
    Run,
    format_paired,
    local_accuracy,
    mean,
    paired_difference,
    plot_curves,
)
from fednano.experiments.results import markdown_table  # noqa: E402
from fednano.experiments.verdicts import MARGIN, Claim, gap_closed  # noqa: E402

SWEEP = ROOT / "configs" / "sweeps" / "merge.toml"
CONFIRM = ROOT / "configs" / "sweeps" / "merge-confirm.toml"
DEFAULT = ROOT / "configs" / "sweeps" / "merge-default.toml"
SCREEN_SEEDS = (0, 1, 2)
SCORED_ROUNDS = (12, 14, 16)
TIE = 0.005  # half a point
CONFIRM_SEEDS = (5, 6, 7, 8, 9)
CONFIRM_ROUNDS = 24
DEFAULT_SEEDS = (0, 1, 2)
RUN = "a0.1-c5-s{seed}"
REFERENCE = "fednano-ffa"  # screened from the convergence archive (same setting, without model.compile)


class ProtocolError(RuntimeError):
    """A run the protocol needs is missing or lacks what the rule reads (names the file)."""


@dataclass(frozen=True)
class Candidate:
    name: str  # the screening variant ("screen-64"), or the reference method's name
    method: str  # federation.strategy
    settings: dict[str, Any]  # the variant's own settings, federation.rounds left out
    folder: Path  # where its runs are: <folder>/a0.1-c5-s<seed>/results.json

    @property
    def short(self) -> str:
        return self.name.removeprefix("screen-")


@dataclass
class Scored:
    candidate: Candidate
    by_seed: dict[int, float] = field(default_factory=dict)  # seed -> mean validation accuracy at SCORED_ROUNDS
    at_rounds: dict[int, list[float]] = field(default_factory=dict)  # seed -> the validation accuracies it averages
    bytes_by_seed: dict[int, float] = field(default_factory=dict)  # seed -> bytes moved in rounds 1..16
    missing: list[str] = field(default_factory=list)  # what is not there yet (one line each)

    @property
    def score(self) -> float | None:
        return mean(self.by_seed.values()) if not self.missing else None

    @property
    def bytes(self) -> float | None:
        return mean(self.bytes_by_seed.values())


# --------------------------------------------------------------------------- the pure rule


def run_score(results: dict[str, Any], rounds: Sequence[int] = SCORED_ROUNDS, where: str = "results.json") -> list[float]:
    """The validation accuracies at `rounds` (all of them, or ProtocolError naming the first one missing)."""
    by_round = {r.get("round"): r.get("validation_accuracy") for r in results.get("rounds") or [] if isinstance(r, dict)}
    out = []
    for k in rounds:
        v = by_round.get(k)
        if not isinstance(v, (int, float)):
            raise ProtocolError(f"{where}: no validation accuracy at round {k}")
        out.append(float(v))
    return out


def bytes_through(results: dict[str, Any], last_round: int) -> float:
    """Bytes moved (every direction, every kind) in rounds 1..last_round."""
    total = 0.0
    for r in results.get("rounds") or []:
        if isinstance(r, dict) and isinstance(r.get("round"), int) and r["round"] <= last_round:
            total += sum(v for v in (r.get("bytes") or {}).values() if isinstance(v, (int, float)))
    return total


def choose(scores: dict[str, float], moved: dict[str, float], tie: float = TIE) -> str:
    """The highest score; among those within `tie` of it, the fewest bytes (then the name, so that the choice is total)."""
    if not scores:
        raise ProtocolError("no candidate has a score")
    best = max(scores.values())
    tied = [n for n, s in scores.items() if best - s <= tie + 1e-12]
    return min(tied, key=lambda n: (moved.get(n, float("inf")), n))


def fall_back(curve: Sequence[float | None]) -> float | None:
    """How far a validation curve falls after its best: best − the lowest value after it (0 if it never falls)."""
    vals = [(i, v) for i, v in enumerate(curve) if v is not None]
    if not vals:
        return None
    top_i, top = max(vals, key=lambda iv: (iv[1], -iv[0]))  # the first best
    later = [v for i, v in vals if i > top_i]
    return max(0.0, top - min(later)) if later else 0.0


def largest_swing(curve: Sequence[float | None]) -> float | None:
    """The largest change between two consecutive validated rounds (None below two)."""
    vals = [v for v in curve if v is not None]
    return max((abs(b - a) for a, b in pairwise(vals)), default=None)


def validation_error(p: float, n: int) -> float:
    """The binomial standard error of one accuracy measured on n validation questions."""
    return (p * (1 - p) / n) ** 0.5


# --------------------------------------------------------------------------- reading the sweeps


def read_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProtocolError(f"{path}: not there (the run has not finished, or its archive was not copied)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ProtocolError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: not a FedNano results.json")
    return data


def candidates(sweep_file: Path = SWEEP, root: Path = ROOT) -> list[Candidate]:
    """merge.toml's screening variants (in its order), then the reference from the convergence archive (paths from `root`)."""
    sweep = tomllib.loads(sweep_file.read_text())
    archive = root / sweep["sweep"]["archive"]
    out: dict[str, Candidate] = {}
    for grid in sweep.get("grid", []):
        name = grid.get("variant", "")
        if not name.startswith("screen-") or name in out:
            continue
        (method,) = grid["methods"]
        settings = {k: v for k, v in grid.get("set", {}).items() if k != "federation.rounds"}
        out[name] = Candidate(name, method, settings, archive / name / method)
    ref = Candidate(REFERENCE, REFERENCE, {}, root / "benchmarks" / "runs" / "convergence" / REFERENCE)
    return [*out.values(), ref]


def score(c: Candidate, seeds: Sequence[int] = SCREEN_SEEDS) -> Scored:
    s = Scored(c)
    for seed in seeds:
        path = c.folder / RUN.format(seed=seed) / "results.json"
        try:
            results = read_results(path)
            if not results.get("final") and not (results.get("rounds") and len(results["rounds"]) >= max(SCORED_ROUNDS)):
                raise ProtocolError(f"{path}: unfinished ({len(results.get('rounds') or [])} rounds)")
            vals = run_score(results, where=str(path))
        except ProtocolError as e:
            s.missing.append(str(e))
            continue
        s.at_rounds[seed] = vals
        s.by_seed[seed] = sum(vals) / len(vals)
        s.bytes_by_seed[seed] = bytes_through(results, max(SCORED_ROUNDS))
    return s


def screening_table(scored: Sequence[Scored]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    rows = []
    for s in scored:
        seeds = [f"{pct(s.by_seed.get(k))}" for k in SCREEN_SEEDS]
        score_ = s.score if s.score is not None else mean(s.by_seed.values())
        setting = ", ".join(f"{k} = {_toml(v)}" for k, v in s.candidate.settings.items()) or s.candidate.method
        rows.append([s.candidate.name, setting, *seeds,
                     pct(score_) + ("" if s.score is not None else " (incomplete)"),
                     "—" if s.bytes is None else f"{s.bytes / 2**20:.0f}"])
    return markdown_table(["candidate", "setting", *(f"seed {k}" for k in SCREEN_SEEDS), "score", "MiB moved, rounds 1–16"], rows,
                          ["---", "---", "---:", "---:", "---:", "---:", "---:"])


def plot_screening(cands: Sequence[Candidate], path: Path, root: Path = ROOT) -> int:
    """Each candidate's validation curve over its first 16 rounds, mean ± std over the seeds it has, beside the paper's
    fednano and fedavg from the convergence archive (references: without model.compile). Returns the runs drawn."""
    refs = [Candidate(m, m, {}, root / "benchmarks" / "runs" / "convergence" / m) for m in ("fednano", "fedavg")]
    runs = []
    for c in [*cands, *refs]:
        for seed in SCREEN_SEEDS:
            path_ = c.folder / RUN.format(seed=seed) / "results.json"
            if not path_.is_file():
                continue
            r = read_results(path_)
            label = c.name if c.name.startswith("screen-") or c.name == REFERENCE else f"{c.name} (reference)"
            config = {**r.get("config", {}), "federation": {**r.get("config", {}).get("federation", {}), "strategy": label}}
            rounds = [x for x in r.get("rounds") or [] if isinstance(x, dict) and x.get("round", 0) <= max(SCORED_ROUNDS)]
            runs.append(Run(path_.parent, {**r, "config": config, "rounds": rounds}))
    if runs:
        plot_curves(runs, path)
    return len(runs)


# --------------------------------------------------------------------------- the sweep files it writes


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _set_block(settings: dict[str, Any]) -> str:
    return "".join(f'"{k}" = {_toml(v)}\n' for k, v in settings.items())


def _grid(variant: str, method: str, alpha: float, seeds: Sequence[int], settings: dict[str, Any]) -> str:
    text = (f'[[grid]]\nvariant = "{variant}"\nmethods = ["{method}"]\nalphas = [{alpha}]\nnum_clients = [5]\n'
            f"seeds = [{', '.join(map(str, seeds))}]\n")
    return text + (f"[grid.set]\n{_set_block(settings)}" if settings else "") + "\n"


def confirm_files(chosen: Candidate, scored: Sequence[Scored], sweep_file: Path = SWEEP) -> tuple[str, str]:
    """(merge-confirm.toml, merge-default.toml) for the chosen candidate."""
    sweep = tomllib.loads(sweep_file.read_text())
    base_set = dict(sweep["sweep"]["set"])
    base_set["federation.rounds"] = CONFIRM_ROUNDS
    table = "\n".join("# " + line for line in screening_table(scored).splitlines())
    head = (f"# Written by `python benchmarks/merge_protocol.py screen --write` from the screening of configs/sweeps/merge.toml, by\n"
            f"# its rule (the mean over seeds 0-2 of the validation accuracy at rounds 12, 14, 16; a tie within 0.5 points to\n"
            f"# fewer bytes). Nothing in this file was chosen by hand. The screening:\n#\n{table}\n#\n"
            f"# The candidate: {chosen.name} ({chosen.method}"
            + (", " + ", ".join(f"{k} = {_toml(v)}" for k, v in chosen.settings.items()) if chosen.settings else "") + ").\n")
    variant = "confirm-" + chosen.short
    confirm = (
        head
        + "#\n# Confirmation: the candidate and fedavg at fresh seeds 5-9 (no screening run used them), 24 rounds, merge.toml's\n"
        "# setting; seed by seed, so that each finished seed is a complete pair. Then centralized at the same seeds (the\n"
        "# issue's goal: the share of fedavg's gap to centralized closed), then the paper's fednano and fednano-ffa if the\n"
        "# budget allows. `python benchmarks/merge_protocol.py confirm` gives the verdict (fednano/experiments/verdicts.py's\n"
        "# rule: 'candidate >= fedavg' holds if the paired 95 % interval's lower bound is above -2 points).\n\n"
        f'[sweep]\nbase_config = "../default.toml"\noutput = "results/merge-confirm"\narchive = "benchmarks/runs/merge-confirm"\n\n'
        f"[sweep.set]\n{_set_block(base_set)}\n"
    )
    for seed in CONFIRM_SEEDS:
        confirm += _grid(variant, chosen.method, 0.1, [seed], chosen.settings)
        confirm += _grid("confirm-fedavg", "fedavg", 0.1, [seed], {})
    for method in ("centralized", "fednano", "fednano-ffa"):
        if method != chosen.method or chosen.settings:
            confirm += _grid(f"confirm-{method}", method, 0.1, list(CONFIRM_SEEDS), {})
    default = (
        head
        + "#\n# The default setting: make run's experiment (configs/default.toml: alpha = 1, 3 rounds), the candidate and fedavg,\n"
        "# seeds 0-2, with nothing else changed. `fednano report results/merge-default` for the table.\n\n"
        '[sweep]\nbase_config = "../default.toml"\noutput = "results/merge-default"\narchive = "benchmarks/runs/merge-default"\n\n'
    )
    default += _grid("default-" + chosen.short, chosen.method, 1.0, list(DEFAULT_SEEDS), chosen.settings)
    default += _grid("default-fedavg", "fedavg", 1.0, list(DEFAULT_SEEDS), {})
    return confirm.rstrip() + "\n", default.rstrip() + "\n"


# --------------------------------------------------------------------------- confirmation


def confirm_cell(label: str, folder: Path, seeds: Sequence[int], run: str = RUN,
                 alpha: float = 0.1) -> tuple[Cell, dict[int, float | None], list[str]]:
    """The finished runs under `folder` as a report Cell, each run's fall-back after its best validation, what is missing."""
    cell, falls, missing = Cell(label, alpha, 5), {}, []
    for seed in seeds:
        path = folder / run.format(seed=seed) / "results.json"
        try:
            r = read_results(path)
        except ProtocolError as e:
            missing.append(str(e))
            continue
        final = r.get("final") or {}
        if not isinstance(final.get("global_accuracy"), (int, float)):
            missing.append(f"{path}: unfinished")
            continue
        best = final.get("best_validation") or {}
        cell.seeds.append(seed)
        cell.global_acc.append(float(final["global_accuracy"]))
        cell.local_by_run.append(local_accuracy(r))
        cell.best_by_run.append(best.get("global_accuracy") if isinstance(best, dict) else None)
        falls[seed] = fall_back([x.get("validation_accuracy") for x in r.get("rounds") or [] if isinstance(x, dict)])
    return cell, falls, missing


def paired_rows(pairs: Sequence[tuple[Cell, Cell]], metrics: Sequence[tuple[str, str]]) -> list[list[str]]:
    """One row per pair and metric: 'a − b' and its paired difference; pairs with no common seed are left out."""
    rows = []
    for a, b in pairs:
        for metric, label in metrics:
            p = paired_difference(a, b, metric)
            if p.n:
                rows.append([f"{a.method} − {b.method}", label, format_paired(p)])
    return rows


def confirmation(archive: Path, confirm_file: Path = CONFIRM) -> str:
    sweep = tomllib.loads(confirm_file.read_text())
    variants = {g["variant"]: g["methods"][0] for g in sweep["grid"]}
    chosen = sweep["grid"][0]["variant"]  # confirm_files writes the candidate's grid first
    cells, falls, missing = {}, {}, []
    for v, method in variants.items():
        cells[v], falls[v], miss = confirm_cell(v, archive / v / method, CONFIRM_SEEDS)
        missing += miss
    cand, fedavg, central = cells[chosen], cells["confirm-fedavg"], cells.get("confirm-centralized")
    claim = Claim(f"{chosen} ≥ fedavg", chosen, "confirm-fedavg", MARGIN, gap_to="confirm-centralized")
    lines = [f"Confirmation of {chosen} against fedavg, seeds {list(CONFIRM_SEEDS)} (archive {archive}):", ""]
    rows = []
    for metric, label in (("best", "at the best validation round"), ("global", f"at round {CONFIRM_ROUNDS}")):
        p: Paired = paired_difference(cand, fedavg, metric)
        ci = p.interval
        closed = gap_closed(cand, fedavg, central, metric) if central is not None and central.n else None
        rows.append([label, format_paired(p), f"**{claim.decide(p)}**", "—" if ci is None else ("yes" if ci[0] > 0 else "no"),
                     "—" if closed is None else f"{100 * closed:.0f} %" + (" (goal: ≥ 50 %)" if closed < 0.5 else "")])
    header = ["test accuracy", f"{chosen} − fedavg, points [95 %] (seeds higher / seeds)", "verdict (≥, margin 2 points)",
              "lower bound > 0", "fedavg's gap to centralized closed"]
    lines.append(markdown_table(header, rows))
    lines += ["", "Fall-back of each validation curve after its best (goal: ≤ 5 points), by seed:", ""]
    frows = [[v, *("—" if falls[v].get(s) is None else f"{100 * falls[v][s]:.1f}" for s in CONFIRM_SEEDS)] for v in variants if cells[v].n]
    lines.append(markdown_table(["variant", *(f"seed {s}" for s in CONFIRM_SEEDS)], frows))
    others = [cells[v] for v in variants if v not in (chosen, "confirm-fedavg", "confirm-centralized") and cells[v].n]
    extra = paired_rows([p for o in others for p in ((o, fedavg), (cand, o))],
                        (("best", "at the best validation round"), ("global", f"at round {CONFIRM_ROUNDS}")))
    if extra:
        lines += ["", "The other methods at the same seeds (reported, not part of the verdict):", "",
                  markdown_table(["difference", "test accuracy", "points [95 %] (seeds higher / seeds)"], extra)]
    if missing:
        lines += ["", "Not there yet:", *(f"- {m}" for m in missing)]
    return "\n".join(lines)


def stability(archives: Sequence[Path]) -> str:
    """Per run folder of each archive (<variant>/<method> or <method>): every finished run's fall-back after its best
    validation and its largest swing between validated rounds, beside what one validation measurement's own noise is
    (its binomial standard error at the best)."""
    rows = []
    for archive in archives:
        for folder in sorted({path.parent.parent for path in archive.rglob("a*-s*/results.json")}):
            runs = sorted(folder.glob("a*-s*/results.json"))
            falls, swings, errors = [], [], []
            for path in runs:
                r = read_results(path)
                if not isinstance((r.get("final") or {}).get("global_accuracy"), (int, float)):
                    continue  # unfinished: its curve is not whole
                curve = [x.get("validation_accuracy") for x in r.get("rounds") or [] if isinstance(x, dict)]
                n = ((r.get("config") or {}).get("data") or {}).get("validation_samples")
                best = max((v for v in curve if v is not None), default=None)
                if best is None or not n:
                    continue
                falls.append(fall_back(curve))
                swings.append(largest_swing(curve))
                errors.append(validation_error(best, n))
            if not falls:
                continue
            pts = ", ".join
            rows.append([f"{archive.name}: {folder.relative_to(archive).as_posix()}", str(len(falls)), pts(f"{100 * f:.1f}" for f in falls),
                         f"{100 * mean(falls):.1f}", pts(f"{100 * w:.1f}" for w in swings), f"{100 * mean(errors):.1f}"])
    header = ["archive: variant", "runs", "fall-back after the best, points (by seed)", "mean",
              "largest swing between validated rounds (by seed)", "one validation's standard error at the best"]
    return markdown_table(header, rows, ["---", "---:", "---", "---:", "---", "---:"])


def default_setting(archive: Path, default_file: Path = DEFAULT) -> str:
    """The candidate against fedavg at make run's setting (alpha = 1, seeds 0-2), by the same verdict rule.

    make run validates nothing (data.validation_samples = 0), so the rule reads the final global test accuracy; the
    clients' own test splits are reported beside it.
    """
    sweep = tomllib.loads(default_file.read_text())
    variants = {g["variant"]: (g["methods"][0], float(g["alphas"][0])) for g in sweep["grid"]}
    chosen = sweep["grid"][0]["variant"]  # confirm_files writes the candidate's grid first
    cells, missing = {}, []
    for v, (method, alpha) in variants.items():
        cells[v], _, miss = confirm_cell(v, archive / v / method, DEFAULT_SEEDS, run=f"a{alpha}-c5-s{{seed}}", alpha=alpha)
        missing += miss
    cand, fedavg = cells[chosen], cells["default-fedavg"]
    claim = Claim(f"{chosen} ≥ fedavg", chosen, "default-fedavg", MARGIN)
    rows = []
    for metric, label in (("global", "global test, after the last round"), ("local", "the clients' own test splits")):
        p = paired_difference(cand, fedavg, metric)
        verdict = f"**{claim.decide(p)}**" if metric == "global" else "(not decided on)"
        rows.append([label, format_paired(p), verdict, "—" if p.interval is None else ("yes" if p.interval[0] > 0 else "no")])
    lines = [f"{chosen} against fedavg at make run's setting, seeds {list(DEFAULT_SEEDS)} (archive {archive}):", "",
             markdown_table(["accuracy", f"{chosen} − fedavg, points [95 %] (seeds higher / seeds)",
                             "verdict (≥, margin 2 points)", "lower bound > 0"], rows)]
    if missing:
        lines += ["", "Not there yet:", *(f"- {m}" for m in missing)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    s = sub.add_parser("screen", help="score the screening by merge.toml's rule; --write the confirmation's sweep files")
    s.add_argument("--plot", type=Path, help="draw the candidates' validation curves (and the references') into this PNG")
    s.add_argument("--write", action="store_true", help="write merge-confirm.toml and merge-default.toml (refused until "
                   "every candidate has all three seeds, and if they exist)")
    c = sub.add_parser("confirm", help="the candidate against fedavg on seeds 5-9, by the verdict rule")
    c.add_argument("--archive", type=Path, default=ROOT / "benchmarks" / "runs" / "merge-confirm", help="the confirmation's archive")
    d = sub.add_parser("default", help="the candidate against fedavg at make run's setting (alpha = 1), seeds 0-2")
    d.add_argument("--archive", type=Path, default=ROOT / "benchmarks" / "runs" / "merge-default", help="the default setting's archive")
    st = sub.add_parser("stability", help="each variant's fall-back and swings, beside the validation set's own noise")
    st.add_argument("archives", type=Path, nargs="+", help="archives of runs, <archive>/[<variant>/]<method>/a*-s*/results.json")
    args = ap.parse_args(argv)
    try:
        if args.step == "stability":
            print(stability(args.archives))
            return 0
        if args.step == "confirm":
            print(confirmation(args.archive))
            return 0
        if args.step == "default":
            print(default_setting(args.archive))
            return 0
        cands = candidates()
        scored = [score(c) for c in cands]
        print(screening_table(scored))
        if args.plot:
            print(f"{args.plot}: {plot_screening(cands, args.plot)} runs drawn")
        missing = [m for s in scored for m in s.missing]
        if missing:
            print("\nNo choice until every candidate has all three seeds. Missing:\n" + "\n".join(f"- {m}" for m in missing))
            return 1 if args.write else 0
        by_name = {s.candidate.name: s for s in scored}
        name = choose({n: s.score for n, s in by_name.items() if s.score is not None},
                      {n: s.bytes for n, s in by_name.items() if s.bytes is not None})
        print(f"\nThe candidate, by the rule: {name} ({100 * by_name[name].score:.1f})")
        if args.write:
            for path in (CONFIRM, DEFAULT):
                if path.exists():
                    raise ProtocolError(f"{path}: exists; the protocol writes it once (delete it by hand to write it again)")
            confirm, default = confirm_files(by_name[name].candidate, scored)
            CONFIRM.write_text(confirm)
            DEFAULT.write_text(default)
            print(f"wrote {CONFIRM.relative_to(ROOT)} and {DEFAULT.relative_to(ROOT)}")
        return 0
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

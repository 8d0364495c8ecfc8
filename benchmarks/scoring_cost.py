"""What scoring by generated answers costs: the global test set scored by the closed set only, and by
the closed set plus generated answers (data.scoring = "generate"), with a finished run's final adapters,
alternately in one process (best of --repeats each, so both see the same machine).

    python benchmarks/scoring_cost.py RUN_DIR [--repeats 2] [--samples 500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.evaluation import Scoring, evaluate
from fednano.client.features import ImageFeatures, Workload
from fednano.data import load_task
from fednano.devices import dtype_of
from fednano.export import read_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=500, help="questions of the run's global test set")
    a = ap.parse_args()
    run = read_run(a.run_dir)
    cfg, bundle = run.cfg, ensure_prepared(run.cfg)
    side = load_nanoedge(bundle / "client", cfg.adapter)
    side.edge.load_adapter_state(run.adapters)
    llm = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype))
    task = load_task(cfg)
    work = Workload(side.tokenizer, ImageFeatures(side.edge.vision), side.edge.num_visual_tokens, task.system)
    test = task.test[: a.samples]
    modes = {"candidates": Scoring(), "candidates + generated": Scoring(cfg.data.answer_tokens, task.normalisers)}
    best: dict[str, float] = {}
    report: dict[str, dict] = {}
    for _ in range(a.repeats):
        for name, scoring in modes.items():
            t0 = time.perf_counter()
            report[name] = evaluate(side.edge, llm, test, work, task.candidate_sets, cfg.train.eval_batch_size, scoring=scoring)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(machine(torch.device("cpu")), f"| {len(test)} questions, eval batch {cfg.train.eval_batch_size}, "
          f"answers up to {cfg.data.answer_tokens} tokens")
    print(f"| scoring | seconds (best of {a.repeats}) | closed-set acc. | generated acc. |")
    print("|---|---:|---:|---:|")
    for name in modes:
        gen = report[name].get("generated_accuracy")
        print(f"| {name} | {best[name]:.1f} | {report[name]['accuracy']:.4f} | {'' if gen is None else f'{gen:.4f}'} |")
    print(f"generated scoring costs {best['candidates + generated'] / best['candidates']:.2f}x the closed set alone")


if __name__ == "__main__":
    main()

"""A paper-scale dry run: `fednano run` on LLaVA-1.5-7B's or MiniGPT-4's architecture with random
weights (configs/dryrun-7b.toml: 2 clients x 1 round x 3 local steps), then the cost of the round:
time by phase, peak memory of the server and of each client, and bytes by kind.

    python benchmarks/dry_run.py --backbone llava-1.5-7b --output /tmp/dry-llava      # on a GPU
    python benchmarks/dry_run.py --backbone minigpt4 --output /tmp/dry-minigpt4
    python benchmarks/dry_run.py --backbone llava-1.5-7b --output /tmp/dry --set federation.client_gpus=0 \\
        --set model.server_device="cpu" --set train.batch_size=1 ...                   # the same flags on a CPU
    python benchmarks/dry_run.py --from /tmp/dry-llava                                 # the table of a finished run

Random weights measure time, memory and bytes only; the run's accuracy means nothing (results.json
says so, and `fednano report` leaves such runs out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {"llava-1.5-7b": ("llava", "llava-1.5-7b"), "minigpt4": ("blip2", "minigpt4")}


def gib(n: float | None) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "—"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(results: dict) -> str:
    cfg, final = results["config"], results.get("final") or {}
    devices = results.get("devices") or final.get("devices") or {}
    server = devices.get("server", {})
    lines = [f"{cfg['model']['backbone']} at the shape of `{cfg['model']['checkpoint']}`, random weights: {final.get('random_weights')}; "
             f"server on {server.get('device')} ({server.get('name')}), {server.get('dtype')}, {server.get('attention')} attention; "
             f"clients on " + ", ".join(f"{pid}: {d.get('device')}" for pid, d in sorted(devices.get("clients", {}).items())),
             "", "| round | seconds (train / client eval / server eval) | split steps | server LLM busy | server peak GPU | server "
                 "peak host RSS | "
             "client peak GPU | client peak host RSS |", "|---:|---|---:|---:|---:|---:|---|---|"]
    for r in results["rounds"]:
        mem, ph = r.get("memory", {}), r["phase_seconds"]
        per = lambda key, mem=mem: ", ".join(f"{pid}: {gib(v)}" for pid, v in sorted(mem.get(key, {}).items())) or "—"  # noqa: E731
        lines.append(f"| {r['round']} | {r['seconds']:.1f} ({ph['train']:.1f} / {ph['client_evaluation']:.1f} / "
                     f"{ph['server_evaluation']:.1f}) | "
                     f"{r['split_steps']} | {r['server_llm_seconds']:.1f} s | {gib(mem.get('server_peak_gpu_bytes'))} | "
                     f"{gib(mem.get('server_peak_rss_bytes'))} | {per('client_peak_gpu_bytes')} | {per('client_peak_rss_bytes')} |")
    lines += ["", "| bytes per round (all clients) | " + " | ".join(f"round {r['round']}" for r in results["rounds"]) + " |",
              "|---|" + "---:|" * len(results["rounds"])]
    for key in results["rounds"][0]["bytes"]:
        lines.append(f"| {key} | " + " | ".join(mib(r["bytes"][key]) for r in results["rounds"]) + " |")
    lines.append("| **total** | " + " | ".join(mib(sum(r["bytes"].values())) for r in results["rounds"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), default="llava-1.5-7b")
    ap.add_argument("--output", type=Path, help="results folder of the run")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra `fednano run --set` overrides")
    ap.add_argument("--from", dest="source", type=Path, help="print the table of a finished run instead of running one")
    args = ap.parse_args()
    out = args.source
    if out is None:
        if args.output is None:
            ap.error("--output is required to run")
        backbone, checkpoint = BACKBONES[args.backbone]
        cmd = [sys.executable, "-m", "fednano", "run", "--config", str(ROOT / "configs" / "dryrun-7b.toml"), "--output", str(args.output),
               "--set", f'model.backbone="{backbone}"', "--set", f'model.checkpoint="{checkpoint}"']
        for s in args.sets:
            cmd += ["--set", s]
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FEDNANO_PROGRESS": "off"})
        if proc.returncode != 0:
            sys.exit(proc.returncode)
        out = args.output
    print(table(json.loads((out / "results.json").read_text())))


if __name__ == "__main__":
    main()

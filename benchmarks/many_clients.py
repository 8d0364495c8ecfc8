"""Many clients, a few sampled per round: server memory and round time against the number of clients.

For each N in --clients: `fednano run` (a real Flower simulation) on the tiny backbone with N clients,
--sampled of them training per round and as many (another seeded sample) scoring the model on their
local test splits (federation.fraction_train = fraction_evaluate = sampled / N), --rounds rounds. From each run's results.json: the server
process's peak RSS, the clients sampled and accepted per round, rejected or dropped clients, split
steps and seconds per round. The server keeps only the global adapters and per-round records, so its
memory should not grow with N; the clients' Ray actors are separate processes.

    python benchmarks/many_clients.py [--clients 10 50 100] [--sampled 10] [--rounds 2] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine

ROOT = Path(__file__).resolve().parents[1]


def run(n: int, sampled: int, rounds: int, out: Path) -> dict:
    share = min(1.0, sampled / n)
    sets = {"data.num_clients": n, "federation.fraction_train": share, "federation.fraction_evaluate": share,
            "federation.min_train_clients": 1, "federation.rounds": rounds}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(ROOT / "configs" / "tiny.toml"), "--output", str(out),
                           *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "FEDNANO_PROGRESS": "off"})
    if proc.returncode != 0:
        raise SystemExit(f"N={n}: fednano run failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    rs = res["rounds"]
    return {
        "clients": n,
        "sampled": [r["clients_sampled"] for r in rs],
        "accepted": [r["clients_accepted"] for r in rs],
        "rejected+dropped": sum(len(r["rejected"]) + len(r["dropped"]) for r in rs),
        "evaluated": [len(r["client_accuracy"]) for r in rs],
        "server_peak_rss_mib": max(r["memory"]["server_peak_rss_bytes"] for r in rs) / 2**20,
        "round_seconds": [r["seconds"] for r in rs],
        "wall_seconds": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--sampled", type=int, default=10, help="clients that train per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None, help="keep the runs' results folders here")
    a = ap.parse_args()
    print(machine(torch.device("cpu")), "(the server and the simulated clients run on the CPU)")
    base = a.output or Path(tempfile.mkdtemp(prefix="fednano-many-"))
    rows = [run(n, a.sampled, a.rounds, base / f"clients-{n}") for n in a.clients]
    print("| clients | trained per round (accepted) | evaluated per round | rejected or dropped | server peak RSS | "
          "seconds per round | run wall time |")
    print("|---:|---|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['sampled']} ({r['accepted']}) | {r['evaluated']} | {r['rejected+dropped']} | "
              f"{r['server_peak_rss_mib']:.0f} MiB | {[round(s) for s in r['round_seconds']]} | {r['wall_seconds']:.0f} s |")
    first = rows[0]["server_peak_rss_mib"]
    ratios = ", ".join(f"N={r['clients']}: {r['server_peak_rss_mib'] / first:.2f}x" for r in rows)
    print(f"server peak RSS relative to N={rows[0]['clients']}: {ratios}")


if __name__ == "__main__":
    main()

"""Where a deployed round's time goes, against the same round in simulation.

Runs `deploy/local-federation.sh` (a SuperLink and --nodes SuperNodes as separate processes on
loopback, TLS and SuperNode auth, `flwr run`) on --config (the tiny one by default; `configs/default.toml`
is `make run`'s smol experiment) for --rounds rounds, then `fednano run` (Flower's Ray simulation) on the
same config, and prints from both results.json files:

- seconds per round (the first round apart: it builds the simulation's actors);
- each message kind (train, evaluate) split into what the client reported (`start`: the fresh ClientApp
  process's age when the message reached FedNano's handler, i.e. interpreter, imports and Flower loading
  the app; `relay`: handing the message to the node's warm worker, its start included on a node's first
  message; `build`: NanoEdge and split channel; `data`: loading and checking the node's data; `work`) and
  what is left of the server's wait for the replies (Flower's delivery: the SuperNode's polling, starting
  the ClientApp process, pushing the reply);
- the ratio deployed / simulation.

With --cold it also runs the deployment without warm workers (node config warm-worker=0: every message
builds the NanoEdge in Flower's fresh ClientApp process), so the three are measured side by side.

    python benchmarks/deployed_round.py [--config configs/tiny.toml] [--rounds 4] [--nodes 2] [--cold] [--output DIR]

Both sides use one prepared bundle: the one in the cache (FEDNANO_CACHE) if it is there, linked into the
deployment's server cache (the deployment would otherwise prepare its own, which for smol means minutes
of connector pre-training and a NanoEdge that differs from the simulation's on another CPU kind).

FLWR_SUPEREXEC_TASK_POLL_INTERVAL sets how often the SuperExecs poll for tasks (Flower's default, 1 s, unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine

from fednano.backbones.prepare import bundle_dir
from fednano.config import dump_toml, load_config

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("start", "relay", "build", "data", "work")


def config(base: Path, rounds: int, nodes: int, out: Path) -> Path:
    """The run config both sides run: `base` with --rounds and --nodes; the prepared bundle linked for the deployment."""
    cfg = load_config(base, {"federation.rounds": rounds, "data.num_clients": nodes})
    path = out / "run.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    prepared = bundle_dir(cfg)  # under FEDNANO_CACHE (the config leaves model.cache_dir empty)
    if (prepared / "prepare.json").exists():
        for name in ("deployed", "deployed-cold"):
            link = out / name / "cache" / prepared.name  # the deployment's server cache (local-federation.sh)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(prepared, target_is_directory=True)
    return path


def deployed(cfg: Path, nodes: int, out: Path, warm: bool = True) -> dict:
    name = "deployed" if warm else "deployed-cold"
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "local-federation.sh"), str(out / name), str(cfg), str(nodes)],
                          capture_output=True, text=True, env={**os.environ, "WARM_WORKER": "1" if warm else "0"})
    if proc.returncode != 0:
        raise SystemExit(f"deployment failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out / name / "out" / "results.json").read_text())


def simulated(cfg: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fednano", "run", "--config", str(cfg), "--output", str(out / "simulated")],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "FEDNANO_PROGRESS": "off"})
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "simulated" / "results.json").read_text())


def breakdown(res: dict) -> dict[str, dict[str, float]]:
    """Per message kind, the median over rounds after the first of: each client phase (the slowest client's),
    and the server's wait minus the slowest client's whole time (Flower's delivery)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for r in res["rounds"][1:]:
        for kind, wait in (("train", r["phase_seconds"]["train"]), ("evaluate", r["phase_seconds"]["client_evaluation"])):
            clients = r.get("client_phase_seconds", {}).get(kind, {})
            if not clients:
                continue
            slowest = max(clients.values(), key=lambda p: sum(p.values()))
            row = rows.setdefault(kind, {})
            for k in PHASES:
                row.setdefault(k, []).append(slowest.get(k, 0.0))
            row.setdefault("delivery", []).append(wait - sum(slowest.values()))
            row.setdefault("total", []).append(wait)
    return {kind: {k: statistics.median(v) for k, v in row.items()} for kind, row in rows.items()}


def per_round(res: dict) -> float:
    return statistics.median(r["seconds"] for r in res["rounds"][1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--cold", action="store_true", help="also deploy without warm workers (node config warm-worker=0)")
    a = ap.parse_args()
    out = a.output or Path(tempfile.mkdtemp(prefix="fednano-deployed-"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(a.config, a.rounds, a.nodes, out)
    runs = {"deployed, warm workers": deployed(cfg, a.nodes, out)}
    if a.cold:
        runs["deployed, no worker"] = deployed(cfg, a.nodes, out, warm=False)
    sim = runs["simulation"] = simulated(cfg, out)
    print(f"# deployed vs simulated round, {a.config.name}, {a.nodes} clients, {a.rounds} rounds; {machine(torch.device('cpu'))}")
    print(f"poll interval FLWR_SUPEREXEC_TASK_POLL_INTERVAL={os.environ.get('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '1 (Flower default)')}\n")
    print("| | first round s | later rounds s (median) | / simulation | accuracy by round | train loss by round |\n"
          "|---|---:|---:|---:|---|---|")
    for name, res in runs.items():
        acc, loss = (" ".join("-" if r[k] is None else f"{r[k]:.{d}f}" for r in res["rounds"]) for k, d in (("global_accuracy", 3),
                                                                                                          ("train_loss", 6)))
        ratio = per_round(res) / per_round(sim)
        print(f"| {name} | {res['rounds'][0]['seconds']:.1f} | {per_round(res):.1f} | {ratio:.2f}x | {acc} | {loss} |")
    for name, res in runs.items():
        if name == "simulation":
            continue
        print(f"\n{name}, per message (slowest client, median of later rounds, seconds):\n")
        print("| message | " + " | ".join(PHASES) + " | Flower delivery | server waited |\n|---|" + "---:|" * (len(PHASES) + 2))
        for kind, row in breakdown(res).items():
            print(f"| {kind} | " + " | ".join(f"{row[k]:.2f}" for k in (*PHASES, "delivery", "total")) + " |")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()

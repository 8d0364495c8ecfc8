"""What a client pays: FedNano's NanoEdge (split learning) vs the whole-MLLM LoRA client
(FedIT / FedDPA-F), each measured in its own fresh process.

Each client loads what it must hold and runs `--steps` training steps on the same
easy-vqa batches (batch 8): the FedNano client against a split server in this
(parent) process over gRPC; the LoRA client on its own LLM. Reported per client:
parameters held; resident memory of the client process once its model is loaded,
and its peak during training (VmHWM, reset after the image features are computed,
which both kinds do alike; both include the ~220 MiB Python/torch runtime); the
seconds per step in all and the CPU seconds the client computes itself; bytes it
sends per step. The two clients
run one after the other on the same machine; ratios are FedIT-LoRA / FedNano.

    python benchmarks/client_cost.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.features import ImageFeatures, Workload
from fednano.client.training import train_local
from fednano.config import RunConfig
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.devices import dtype_of
from fednano.split.server import SplitServer


def _status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _client(kind: str, address: str, steps: int) -> dict:
    """Runs in a child process: load one client, train, report its own costs."""
    torch.set_num_threads(1)  # as a simulated client (federation.client_cpus = 1)
    cfg = RunConfig()
    cfg.train.local_steps = steps
    bundle = ensure_prepared(cfg)
    t_load = time.perf_counter()
    edge_bundle = load_nanoedge(bundle / "client", cfg.adapter)
    edge = edge_bundle.edge
    work = Workload(edge_bundle.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    samples = list(load_split("train")[: 8 * steps])
    params = None
    held = sum(p.numel() for p in edge.parameters())
    if kind == "fednano":
        from fednano.split.client import SplitClient

        endpoint = SplitClient(address, cfg.split.wire_dtype)
    else:
        from fednano.methods.whole_llm import GLOBAL, LoRAEndpoint, add_lora, train_only

        llm = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype))
        add_lora(llm, cfg.adapter, (GLOBAL,))
        params = train_only(llm, GLOBAL)
        endpoint = LoRAEndpoint(llm)
        held += sum(p.numel() for p in llm.model.parameters()) - edge.embed_tokens.weight.numel()
    load_s = time.perf_counter() - t_load
    loaded = _status("VmRSS")
    work.images(samples)  # encoder features once, as a client does (the same for both kinds)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: measure training alone
    cpu0, t0 = time.process_time(), time.perf_counter()
    train_local(edge, endpoint, samples, work, cfg.train, torch.Generator().manual_seed(0), params=params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sent = endpoint.traffic()["activations_up"] if kind == "fednano" else 0
    return {"kind": kind, "held": held, "loaded_rss_mib": loaded, "peak_rss_mib": _status("VmHWM"),
            "load_s": load_s, "step_s": wall / steps, "client_cpu_s": cpu / steps, "bytes_up_per_step": sent / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="training steps per client (default 6)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "ADDRESS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_client(args.child[0], args.child[1], args.steps)))
        return
    cfg = RunConfig()
    llm = load_server_llm(ensure_prepared(cfg), dtype_of(cfg.model.llm_dtype))
    rows = {}
    with SplitServer(llm) as server:
        for kind in ("fednano", "fedit-lora"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", kind, server.address],
                                 capture_output=True, text=True, check=True)
            rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = rows["fednano"], rows["fedit-lora"]
    print(f"{args.steps} training steps, batch 8, easy-vqa, smol backbone (bf16 LLM), one client process each\n")
    print("| client | parameters held | RSS loaded (MiB) | peak RSS training (MiB) | load (s) | s / step | client CPU s / step | "
          "bytes up / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("FedNano (NanoEdge, split)", a), ("FedIT-LoRA (whole MLLM)", b)):
        print(f"| {name} | {r['held']:,} | {r['loaded_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['load_s']:.1f} | "
              f"{r['step_s']:.2f} | {r['client_cpu_s']:.2f} | {r['bytes_up_per_step']:,.0f} |")
    print(
        f"\nratios FedIT-LoRA / FedNano: parameters {b['held'] / a['held']:.1f}x, "
        f"RSS loaded {b['loaded_rss_mib'] / a['loaded_rss_mib']:.2f}x, "
        f"peak RSS training {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x, "
        f"client CPU per step {b['client_cpu_s'] / a['client_cpu_s']:.1f}x, wall per step {b['step_s'] / a['step_s']:.2f}x"
    )


if __name__ == "__main__":
    main()

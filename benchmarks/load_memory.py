"""Peak host memory while the server loads its LLM, against the checkpoint's size on disk.

Writes a checkpoint of random bf16 weights at a real MLLM's shape (LLaVA-1.5-7B by default:
every tensor of LlavaForConditionalGeneration, in safetensors shards, with its config and a
tokenizer), then loads it in a fresh process per mode and reports that process's peak resident
memory above what it held before loading:

    fednano  load_server_llm: from_pretrained straight into bf16 on the target device, then the
             vision tower and projector (client parts) are dropped
    fp32     what FedNano did before: from_pretrained in float32, then cast to bf16

    python benchmarks/load_memory.py --dir /tmp/llava-7b-random                  # fednano, 7B
    python benchmarks/load_memory.py --dir /tmp/llava-2b-random --layers 8 --modes fednano fp32

Weights loaded from safetensors may stay pages of the memory-mapped file until read; each mode
reads every parameter once after loading (as the first step does), so the peak is what serving
keeps resident.

The fp32 mode needs about 4 bytes per parameter of host memory (28 GB at 7B), so compare the
two modes at a reduced depth (--layers) on a small machine. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 2 * 2**30


def write_checkpoint(out: Path, shape: str, layers: int | None, seed: int = 0) -> int:
    """Random bf16 weights for every tensor of the model, written shard by shard (never all in memory)."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from fednano.backbones.bundle import random_mllm_config

    if (out / "model.safetensors.index.json").exists():
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))
    cfg, tok = random_mllm_config(shape, "llava")
    if layers:
        cfg.text_config.num_hidden_layers = layers
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map, n, size = {}, 0, 0

    def flush() -> None:
        nonlocal shard, n, size
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, n, size = {}, n + 1, 0

    for key, (shp, dtype) in shapes.items():
        t = (
            (torch.randn(shp, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            if dtype.is_floating_point
            else torch.zeros(shp, dtype=dtype)
        )
        shard[key] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return total


CHILD = r"""
import json, resource, sys, time, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
mode, path, bundle = sys.argv[1], sys.argv[2], sys.argv[3]
from fednano.backbones.bundle import load_hf_mllm, load_server_llm
before = rss()
t0 = time.perf_counter()
if mode == "fednano":
    model = load_server_llm(bundle, torch.bfloat16, "cpu").model
else:
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16)
seconds = time.perf_counter() - t0
# Weights may still be pages of the memory-mapped checkpoint that nobody has read: read every one
# (as the first step will), so the peak counts what serving really keeps resident.
with torch.no_grad():
    for p in model.parameters():
        p.sum()  # reads every page of the tensor, without a copy of it
params = sum(p.numel() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "after": rss(), "seconds": seconds, "params": params}))
"""


def measure(mode: str, ckpt: Path) -> dict:
    bundle = ckpt.parent / (ckpt.name + "-bundle")
    bundle.mkdir(exist_ok=True)
    (bundle / "server.json").write_text(json.dumps({"kind": "llava", "path": str(ckpt)}))
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt), str(bundle)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-400:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is written (reused if present)")
    ap.add_argument("--shape", default="llava-1.5-7b", help="a shipped LLaVA configuration")
    ap.add_argument("--layers", type=int, default=None, help="override the LLM's depth (to compare with the fp32 path on a small machine)")
    ap.add_argument("--modes", nargs="+", default=["fednano"], choices=["fednano", "fp32"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    size = write_checkpoint(args.dir, args.shape, args.layers)
    written = time.perf_counter() - t0
    print(
        f"\nCheckpoint: {args.shape}{f' at {args.layers} layers' if args.layers else ''}, random bf16 weights, "
        f"{size / 2**30:.2f} GiB on disk ({written:.0f} s to write or find)\n"
    )
    print("| loader | parameters held after loading | seconds | peak host memory above the process before loading | / checkpoint size |")
    print("|---|---:|---:|---:|---:|")
    for mode in args.modes:
        r = measure(mode, args.dir)
        if "error" in r:
            print(f"| {mode} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | |")
            continue
        extra = r["peak"] - r["before"]
        print(f"| {mode} | {r['params'] / 1e9:.2f}B | {r['seconds']:.1f} | {extra / 2**30:.2f} GiB | **{extra / size:.2f}** |")


if __name__ == "__main__":
    main()

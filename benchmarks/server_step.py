"""Benchmark the split-learning step on this machine, side by side in one run.

Real weights (default; the prepared smol bundle, `fednano prepare`):
  * this device's bf16 and fp32 matmul rate (the reference peak);
  * the server step (SmolLM2-135M, loss + d loss / d embeddings) in several variants:
      ours-bf16  : bf16, logits only at labelled positions (what FedNano runs)
      ours-bf16-eager-attn : the same with model.attention = "eager" (plain matmul + softmax attention)
      ours-bf16-compiled, ours-bf16-eager-attn-compiled : those two with the decoder under torch.compile
                 (inductor), with --compile
      full-head  : bf16, HF's own loss: full-vocabulary head over every position
      ours-fp32  : fp32, logits only at labelled positions
    timed interleaved (one step of each in turn), each with its own copy of the LLM.
    FLOPs are counted by torch's FLOP formulas on the real step, so achieved
    GFLOP/s / matmul GFLOP/s is an honest utilisation ratio;
  * the client step (NanoEdge forward + backward into the adapters) and a full
    split step over the real gRPC channel on loopback, with bytes per step.

    python benchmarks/server_step.py [--device auto] [--batch 8] [--repeats 5]

Random weights at the paper's scale (throughput, memory and bytes only: no accuracy):
  the LLM of LLaVA-1.5-7B or MiniGPT-4 (Vicuna-7B) built from the configurations
  FedNano ships, bf16, one step on batch x (visual + text) tokens with labels on
  the last 4 tokens of each sample, against the matmul rate measured in the same run.

    python benchmarks/server_step.py --device cuda --backbone llava-1.5-7b --random-weights [--batch 8]
    python benchmarks/server_step.py --device cuda --backbone minigpt4 --random-weights
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from common import SHAPES, count_flops, machine, matmul_gflops, random_llm, server_step_cost, sync, timeit

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.features import ImageFeatures, Workload
from fednano.config import RunConfig
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.devices import resolve_device
from fednano.split.client import SplitClient
from fednano.split.frames import Frame, encode
from fednano.split.server import SplitServer


def full_head_step(llm, embeds, mask, labels):
    """The naive step: HF's loss, full-vocabulary logits at every position."""
    x = embeds.to(llm.device, llm.dtype).requires_grad_(True)
    out = llm.model(inputs_embeds=x, attention_mask=mask)
    logits = out.logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


def where_time_goes(step, top: int = 8) -> str:
    """torch's profiler over 3 steps: the operators that take the most time (self time), as a Markdown table."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | share of the step's CPU time | calls per step |", "|---|---:|---:|"]
    lines += [f"| {e.key[:70]} | {100 * e.self_cpu_time_total / total:.1f} % | {e.count // 3} |" for e in events[:top]]
    return "\n".join(lines)


def interleaved(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step, timed in turn (one call of each, `repeats` times over) so that every variant sees
    the same machine: a shared, noisy machine slows them alike instead of whichever ran during a busy minute."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_decoder(llm, step, work, edge) -> str:
    """Compile the LLM's training steps (ServerLLM.compile_training: inductor, dynamic shapes, as a batch's length varies)
    in place, and time what that costs: the first step (tracing and code generation) and the first step at a new sequence length."""
    llm.compile_training()  # what model.compile = true does: torch.compile(decoder, dynamic=True) for the training steps
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    pool, length = list(load_split("train")), step()[1].shape[1]
    batches = (work.train_batch(pool[i : i + 8]) for i in range(8, len(pool), 8))
    batch2, feats2 = next(b for b in batches if b[0].input_ids.shape[1] != length)
    with torch.no_grad():
        embeds2 = edge.embed(batch2.input_ids, feats2)
    t0 = time.perf_counter()
    llm.train_step(embeds2, batch2.attention_mask, batch2.labels)
    other = time.perf_counter() - t0
    return (f"torch.compile (inductor, dynamic=True): the first step took {first:.1f} s (compilation); the first at another "
            f"length ({embeds2.shape[1]} tokens against the benchmark's {length}) {other:.1f} s")


def paper_scale(args: argparse.Namespace, device: torch.device) -> None:
    """One server step of a random-weight LLM at a named MLLM's shape (throughput only)."""
    peak = matmul_gflops(torch.bfloat16, device)
    t0 = time.perf_counter()
    llm = random_llm(args.backbone, device)
    build = time.perf_counter() - t0
    c = server_step_cost(llm, args.batch, SHAPES[args.backbone], args.text_tokens, args.answer_tokens, args.repeats, device, peak)
    n_params = sum(p.numel() for p in llm.model.parameters())
    print(f"\nServer step, random weights at {args.backbone}'s shape: LLM {n_params / 1e9:.2f}B parameters, bf16, "
          f"{llm.model.config._attn_implementation} attention, on {machine(device)}")
    print(f"matmul {'8192' if device.type == 'cuda' else '2048'}^3 bf16: {peak:,.0f} GFLOP/s (measured in this run); "
          f"LLM built in {build:.1f} s\n")
    print("| LLM shape | batch x tokens | seconds | TFLOP counted | achieved TFLOP/s | / matmul rate | samples/s | peak activation "
          "memory | bytes up / down per step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    mem = f"{c['activation_gib']:.1f} GiB" if c["activation_gib"] is not None else "n/a (CPU)"
    print(f"| {args.backbone} | {args.batch} x {c['tokens']} ({SHAPES[args.backbone]} visual + {args.text_tokens} text) | "
          f"{c['seconds']:.3f} | {c['tflop']:.2f} | {c['achieved_tflops']:.2f} | **{c['fraction_of_matmul']:.3f}** | "
          f"{c['samples_per_s']:.3g} | {mem} | {c['bytes_up']:,} / {c['bytes_down']:,} |")


def smol_real(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter, device)
    edge = client.edge
    work = Workload(client.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    samples = list(load_split("train")[: args.batch])
    batch, feats = work.train_batch(samples)
    B, T = batch.input_ids.shape
    with torch.no_grad():
        embeds = edge.embed(batch.input_ids, feats)

    peak_bf16, peak_fp32 = matmul_gflops(torch.bfloat16, device), matmul_gflops(torch.float32, device)
    variants = [("ours-bf16", torch.bfloat16, "sdpa"), ("ours-bf16-eager-attn", torch.bfloat16, "eager"),
                ("full-head", torch.bfloat16, "sdpa"), ("ours-fp32", torch.float32, "sdpa")]
    if args.compile:
        variants[2:2] = [("ours-bf16-compiled", torch.bfloat16, "sdpa"), ("ours-bf16-eager-attn-compiled", torch.bfloat16, "eager")]
    steps, flops, grads, notes, profiles = {}, {}, {}, [], {}
    for name, dtype, attention in variants:  # each variant its own copy of the LLM, so that all can be timed interleaved
        llm = load_server_llm(bundle, dtype, device)
        llm.set_attention(attention)
        if name == "full-head":
            step = lambda m=llm: full_head_step(m, embeds, batch.attention_mask.to(device), batch.labels.to(device))  # noqa: E731
        else:
            step = lambda m=llm: m.train_step(embeds, batch.attention_mask, batch.labels)  # noqa: E731
        flops[name] = count_flops(step)  # before compiling: torch's FLOP counter sees the eager ops (the same maths)
        if name.endswith("-compiled"):
            notes.append(f"{name}: " + compile_decoder(llm, step, work, edge))
        grads[name], steps[name] = step()[1].float(), step
        if args.profile and name.startswith("ours-bf16"):
            profiles[name] = where_time_goes(step)
    times = interleaved(steps, args.repeats, device)
    rows = []
    for name, dtype, _ in variants:
        sec, peak = times[name], peak_bf16 if dtype == torch.bfloat16 else peak_fp32
        rows.append((name, sec, flops[name], flops[name] / sec / 1e9, flops[name] / sec / 1e9 / peak_bf16, flops[name] / sec / 1e9 / peak))

    # client side and the real channel (bf16 wire, as in training)
    llm = load_server_llm(bundle, torch.bfloat16, device)
    params = list(edge.adapter_parameters().values())

    def client_only():
        e = edge.embed(batch.input_ids, feats)
        e.backward(torch.ones_like(e))
        for p in params:
            p.grad = None

    client_sec = timeit(client_only, args.repeats, device)
    fresh = ImageFeatures(edge.vision)
    encode_sec = timeit(lambda: (fresh._memo.clear(), fresh([s.image_path for s in samples])), args.repeats, device)
    frame = encode(
        Frame(
            "train",
            {"embeds": embeds.to(torch.bfloat16), "mask": batch.attention_mask.to(torch.uint8), "labels": batch.labels.to(torch.int32)},
        )
    )
    with SplitServer(llm) as server, SplitClient(server.address, "bfloat16") as split:
        # The same frame handled in-process (decode + LLM + encode, on a worker thread as
        # gRPC does) and over gRPC on loopback, interleaved so both see the same machine.
        worker = ThreadPoolExecutor(1)
        handle = lambda: worker.submit(server.service.handle, frame).result()  # noqa: E731
        wire = lambda: split.request_bytes(frame, "train")  # noqa: E731
        handle(), wire()
        t_handle, t_wire = [], []
        for _ in range(args.repeats):
            for fn, acc in ((handle, t_handle), (wire, t_wire)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        handle_sec, wire_sec = statistics.median(t_handle), statistics.median(t_wire)

        def split_step():
            e = edge.embed(batch.input_ids, feats)
            _, g, _ = split.train_step(e, batch.attention_mask, batch.labels)
            e.backward(g)

        split_sec = timeit(split_step, args.repeats, device)
        up = split.bytes_up["train"] / split.calls["train"]
        down = split.bytes_down["train"] / split.calls["train"]
    payload = len(encode(Frame("x", {"e": embeds.to(torch.bfloat16)})))

    print(f"\nSplit step benchmark: SmolLM2-135M server, batch {B} x {T} tokens, on {machine(device)}\n")
    print(f"matmul: bf16 {peak_bf16:.0f} GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s (ratio {peak_bf16 / peak_fp32:.2f}x)\n")
    print("| server step | seconds | GFLOP counted | achieved GFLOP/s | / bf16 matmul peak | / same-dtype peak | grad vs fp32 (rel. L2) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref = grads["ours-fp32"]
    for name, sec, counted, rate, r_bf16, r_same in rows:
        diff = float((grads[name] - ref).norm() / ref.norm())
        print(f"| {name} | {sec:.3f} | {counted / 1e9:.1f} | {rate:.0f} | {r_bf16:.2f} | {r_same:.2f} | {diff:.4f} |")
    sec = {r[0]: r[1] for r in rows}
    print(f"\nspeed-up of ours-bf16: {sec['full-head'] / sec['ours-bf16']:.2f}x over full-head, {sec['ours-fp32'] / sec['ours-bf16']:.2f}x "
          f"over ours-fp32; eager attention: {sec['ours-bf16'] / sec['ours-bf16-eager-attn']:.2f}x over the fused kernel"
          + (f"; torch.compile: {sec['ours-bf16'] / sec['ours-bf16-compiled']:.2f}x over eager (SDPA), "
             f"{sec['ours-bf16-eager-attn'] / sec['ours-bf16-eager-attn-compiled']:.2f}x (eager attention)" if args.compile else "") + "\n")
    for note in notes:
        print(note + "\n")
    for name, table in profiles.items():
        print(f"where a {name} step's time goes (torch profiler, 3 steps):\n\n{table}\n")
    print("| client / channel | value |")
    print("|---|---:|")
    print(f"| client NanoEdge forward+backward (features cached) | {client_sec * 1000:.1f} ms |")
    print(f"| vision encoder, {B} new images (EfficientNet-Lite0, 224 px) | {encode_sec * 1000:.0f} ms |")
    print(f"| server handles one frame in-process (decode + LLM step + encode) | {handle_sec:.3f} s |")
    print(f"| the same frame over gRPC loopback | {wire_sec:.3f} s |")
    cost = f"{(wire_sec - handle_sec) * 1000:.0f} ms ({wire_sec / handle_sec:.2f}x)"
    print(f"| gRPC channel cost per step (difference, interleaved medians) | {cost} |")
    print(f"| full split step, client and server in one process | {split_sec:.3f} s |")
    print(f"| bytes up per step (embeds bf16 + mask + labels + header) | {up:,.0f} |")
    print(f"| bytes down per step (grad bf16 + loss + header) | {down:,.0f} |")
    print(f"| of which raw embeddings (B x T x d x 2 bytes) | {B * T * edge.dim * 2:,} (frame {payload:,}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="'auto' (a CUDA GPU when there is one), 'cpu', 'cuda', 'cuda:N'")
    ap.add_argument("--backbone", default="smol", choices=sorted(SHAPES), help="whose LLM (random weights for the 7B ones)")
    ap.add_argument("--random-weights", action="store_true", help="build the LLM from its shipped configuration with random weights")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (default 8, the training default)")
    ap.add_argument("--text-tokens", type=int, default=64, help="random weights: text tokens per sample besides the visual ones")
    ap.add_argument("--answer-tokens", type=int, default=4, help="random weights: labelled tokens per sample")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (median reported)")
    ap.add_argument("--compile", action="store_true", help="also time the bf16 step with the decoder under torch.compile (inductor; "
                    "compiling takes minutes on a CPU)")
    ap.add_argument("--profile", action="store_true", help="also print where a bf16 step's time goes (torch's profiler), per attention")
    args = ap.parse_args()
    device = resolve_device(args.device, "--device")
    if args.random_weights:
        paper_scale(args, device)
    elif args.backbone != "smol":
        ap.error(f"{args.backbone}: its weights cannot be had here; add --random-weights")
    else:
        smol_real(args, device)


if __name__ == "__main__":
    main()

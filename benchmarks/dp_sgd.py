"""Sample-level DP-SGD on the real smol backbone (`privacy.dp_sgd`): what a step costs against a standard split step,
and how much of a step's gradient survives the noise each privacy budget needs in the DP tables' setting.

    python benchmarks/dp_sgd.py [--batch 8] [--repeats 5] [--epsilons 1,8] [--steps 100] [--n 238]

Cost: one training step in process (the server's LLM in bf16, no network), standard (mean loss, one backward) vs DP
(summed loss, per-sample adapter gradients in closed form, clipping, noise), interleaved, medians.
Signal: the noise multiplier that spends ε at δ = 1e-5 over `--steps` steps at q = batch / n (configs/privacy-dp.toml:
10 rounds × 10 steps, a median client's 238 samples), and the cosine between the privatized gradient and the clipped
mean without noise, averaged over 20 noise draws, for the NanoAdapters at initialisation and after 20 plain steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import CPU, machine

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.dp_sgd import DPSGD, clip_and_sum, privatize, sample_gradients
from fednano.client.features import ImageFeatures, Workload
from fednano.client.training import batches, split_step
from fednano.config import RunConfig
from fednano.data.easyvqa import SYSTEM_PROMPT
from fednano.data.partition import partitions
from fednano.privacy import noise_for_epsilon


def flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.float().flatten() for v in t.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epsilons", default="1,8")
    ap.add_argument("--steps", type=int, default=100, help="steps the budget covers (rounds × local steps)")
    ap.add_argument("--n", type=int, default=238, help="the client's training samples (q = batch / n)")
    ap.add_argument("--clip", type=float, default=1.0)
    args = ap.parse_args()
    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    edge = client.edge
    work = Workload(client.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    train = partitions(cfg)[0].train
    llm = load_server_llm(bundle, torch.bfloat16)
    params = edge.adapter_parameters()
    batch = work.train_batch(train[: args.batch])
    print(f"DP-SGD, SmolLM2-135M bf16 in process, batch {tuple(batch[0].input_ids.shape)}, on {machine(CPU)}\n")
    dp = DPSGD(args.clip, 1.0, args.batch / args.n, args.n, torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"standard": [], "DP-SGD": []}
    for _ in range(args.repeats + 1):
        for name, step in (("standard", lambda: split_step(edge, llm, *batch)), ("DP-SGD", lambda: dp.step(edge, llm, batch, params))):
            edge.zero_grad(set_to_none=True)
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    std, priv = (statistics.median(times[k][1:]) for k in ("standard", "DP-SGD"))
    print("| step | s (median) |\n|---|---:|")
    print(f"| standard | {std:.3f} |\n| DP-SGD | {priv:.3f} ({priv / std:.2f}×) |")
    signal(edge, llm, work, train, params, args)


def signal(edge, llm, work: Workload, train: list, params: dict, args: argparse.Namespace) -> None:
    q = args.batch / args.n
    sigmas = {float(e): noise_for_epsilon(float(e), 1e-5, q, args.steps) for e in args.epsilons.split(",")}
    print(f"\nthe noise's toll at q = {args.batch}/{args.n}, {args.steps} steps, δ = 1e-5, clip {args.clip} "
          "(cosine of the privatized gradient to the clipped mean, mean of 20 draws; share of samples clipped):\n")
    print("| adapters | ε | σ | cosine | samples clipped |\n|---|---:|---:|---:|---:|")
    opt = torch.optim.AdamW(list(params.values()), lr=RunConfig().train.lr)
    for label in ("at initialisation", "after 20 plain steps"):
        if label != "at initialisation":
            stream = batches(train, args.batch, torch.Generator().manual_seed(1))
            for _ in range(20):
                opt.zero_grad(set_to_none=True)
                split_step(edge, llm, *work.train_batch(next(stream)))
                opt.step()
        _, per_sample = sample_gradients(edge, llm, *work.train_batch(train[: args.batch]))
        sums, norms = clip_and_sum({k: per_sample[k] for k in params}, args.clip)
        clean = flat(privatize(sums, args.clip, 0.0, args.batch, torch.Generator()))
        clipped = float((norms > args.clip).float().mean())
        for eps, sigma in sigmas.items():
            g = torch.Generator().manual_seed(0)
            cos = [float(F.cosine_similarity(flat(privatize(sums, args.clip, sigma, args.batch, g)), clean, dim=0)) for _ in range(20)]
            print(f"| {label} | {eps:g} | {sigma:.2f} | {statistics.mean(cos):.3f} | {clipped:.2f} |")


if __name__ == "__main__":
    main()

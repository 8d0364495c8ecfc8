"""The label-private (U-shaped) split on the real smol backbone: what a step costs against the standard split, and
how much of the labels the known-head gradient attack still reads at each level of privacy.gradient_noise.

    python benchmarks/label_private.py [--batch 8] [--repeats 5] [--levels 0,0.1,0.3,1,3,10]

Cost: one training step over the real gRPC channel on loopback (bf16 wire), standard vs label-private, interleaved,
medians; bytes per step both ways. Attack: on the batch's answer tokens, with the NanoAdapters at initialisation, the
server's view (the hidden states it sent, the noised gradient it got back, its own head); next to it, how far the noise
turns the client's embedding gradient (cosine to the noiseless one), the training signal the noise costs.
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
from fednano.client.features import ImageFeatures, Workload
from fednano.config import RunConfig
from fednano.data.easyvqa import SYSTEM_PROMPT
from fednano.data.partition import partitions
from fednano.data.prompts import IGNORE_INDEX
from fednano.split.client import SplitClient
from fednano.split.label_private import LabelPrivateClient, head_loss, labels_from_gradients, noised_gradient
from fednano.split.server import SplitServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--levels", default="0,0.1,0.3,1,3,10", help="privacy.gradient_noise levels")
    ap.add_argument("--attack-samples", type=int, default=64, help="training samples (of client 0) the attack runs on")
    args = ap.parse_args()
    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    edge = client.edge
    work = Workload(client.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    batch, feats = work.train_batch(partitions(cfg)[0].train[: args.batch])
    with torch.no_grad():
        embeds = edge.embed(batch.input_ids, feats)
    llm = load_server_llm(bundle, torch.bfloat16)
    head = edge.embed_tokens.weight.detach()
    print(f"label-private split, SmolLM2-135M bf16, batch {tuple(batch.input_ids.shape)}, on {machine(CPU)}\n")
    with SplitServer(llm) as server, SplitClient(server.address) as plain, LabelPrivateClient(server.address, head=head) as private:
        times: dict[str, list[float]] = {"standard": [], "label-private": []}
        for _ in range(args.repeats + 1):
            for name, c in (("standard", plain), ("label-private", private)):
                t = time.perf_counter()
                c.train_step(embeds, batch.attention_mask, batch.labels)
                times[name].append(time.perf_counter() - t)
        print("| split | s / step (median) | bytes up / step | bytes down / step |\n|---|---:|---:|---:|")
        for name, c in (("standard", plain), ("label-private", private)):
            tr, steps = c.traffic(), args.repeats + 1
            sec = statistics.median(times[name][1:])
            print(f"| {name} | {sec:.3f} | {tr['activations_up'] // steps:,} | {tr['gradients_down'] // steps:,} |")
    attack(llm, work, edge, head, partitions(cfg)[0].train[: args.attack_samples], [float(x) for x in args.levels.split(",")])


def attack(llm, work: Workload, edge, head: torch.Tensor, samples: list, levels: list[float]) -> None:
    """The known-head attack's reading of the labels at each noise level, and the noise's toll on the gradient."""
    batch, feats = work.train_batch(samples)
    with torch.no_grad():
        embeds = edge.embed(batch.input_ids, feats)
    targets = batch.labels[:, 1:]
    sel = targets != IGNORE_INDEX
    positions = F.pad(sel, (0, 1), value=False)
    hidden = llm.hidden_states(embeds, batch.attention_mask, positions).float()
    _, g = head_loss(hidden, targets[sel], head, "mean")
    clean = llm.hidden_backward(embeds, batch.attention_mask, positions, g).float().flatten()
    n = int(sel.sum())
    print(f"\nthe known-head attack on {len(samples)} training samples of client 0:\n")
    print(f"| gradient_noise | answer tokens the server reads (of {n}) | cosine of the embedding gradient to the noiseless one |")
    print("|---:|---:|---:|")
    for level in levels:
        noisy = noised_gradient(g, level, torch.Generator().manual_seed(0)) if level else g
        read = labels_from_gradients(hidden, noisy, llm.head.weight.detach(), scale=1 / n)
        got = llm.hidden_backward(embeds, batch.attention_mask, positions, noisy).float().flatten()
        print(f"| {level:g} | {int((read == targets[sel]).sum())} ({(read == targets[sel]).float().mean():.3f}) | "
              f"{float(F.cosine_similarity(got, clean, dim=0)):.3f} |")


if __name__ == "__main__":
    main()

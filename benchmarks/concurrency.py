"""Split-server throughput with 1 to 64 concurrent clients, micro-batched vs not.

Each client is a thread with its own SplitClient and gRPC stream, sending training
frames back to back (batch 8 easy-vqa-sized samples, bf16 wire). The server either
runs every step alone, or merges the steps that are waiting into one forward/backward
while the merged batch stays within `--max-batch-tokens` (split.max_batch_tokens).
Both modes run in the same process, alternating per client count (best of
--repeats each), so they see the same machine.

    python benchmarks/concurrency.py [--device auto] [--steps 4] [--clients 1 2 4 8 16 32 64]
    python benchmarks/concurrency.py --device cuda --random-weights     # SmolLM2-135M shapes, no weights needed

Real weights (default) need the prepared smol bundle; --random-weights builds
SmolLM2-135M from its configuration (what the GPU machine can do without the GGUF).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from common import machine, random_llm, random_request

from fednano.config import RunConfig, SplitConfig
from fednano.data.easyvqa import SYSTEM_PROMPT
from fednano.devices import resolve_device
from fednano.server.llm import ServerLLM
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer


def run(llm: ServerLLM, batching: bool, n_clients: int, steps: int, request: tuple, max_tokens: int) -> tuple[float, int]:
    """-> (samples per second, LLM passes)."""
    emb, mask, labels, _ = request
    # no token here, so every client is 'anonymous': the per-client stream cap must admit them all
    cfg = SplitConfig(micro_batching=batching, max_batch_tokens=max_tokens, max_streams=max(64, n_clients),
                      max_streams_per_client=max(4, n_clients))
    with SplitServer(llm, cfg) as server:
        clients = [SplitClient(server.address, "bfloat16") for _ in range(n_clients)]
        for c in clients:
            c.train_step(emb, mask, labels)  # open streams, warm up
        server.service.worker.steps.update(train_requests=0, llm_passes=0)
        start = threading.Barrier(n_clients + 1)

        def work(c: SplitClient) -> None:
            start.wait()
            for _ in range(steps):
                c.train_step(emb, mask, labels)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        passes = server.service.worker.steps["llm_passes"]
        for c in clients:
            c.close()
    return n_clients * steps * emb.shape[0] / elapsed, passes


def real_request(device: torch.device) -> tuple[ServerLLM, tuple]:
    """SmolLM2-135M with its real weights and a real easy-vqa training frame."""
    from fednano.backbones.bundle import load_nanoedge, load_server_llm
    from fednano.backbones.prepare import ensure_prepared
    from fednano.client.features import ImageFeatures, Workload
    from fednano.data.easyvqa import load_split

    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    work = Workload(client.tokenizer, ImageFeatures(client.edge.vision), client.edge.num_visual_tokens, SYSTEM_PROMPT)
    tb, feats = work.train_batch(list(load_split("train")[:8]))
    with torch.no_grad():
        emb = client.edge.embed(tb.input_ids, feats).to(torch.bfloat16)
    return load_server_llm(bundle, torch.bfloat16, device), (emb, tb.attention_mask, tb.labels, "mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="where the server LLM runs: 'auto', 'cpu', 'cuda', 'cuda:N'")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M from its configuration, random weights, a random 8 x "
                                                                  "45 frame")
    ap.add_argument("--steps", type=int, default=4, help="steps per client (default 4)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="client counts to try")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repetitions per mode; the best of each is reported")
    ap.add_argument(
        "--max-batch-tokens", type=int, default=SplitConfig().max_batch_tokens, help="split.max_batch_tokens for the batched mode"
    )
    args = ap.parse_args()
    device = resolve_device(args.device, "--device")
    if args.random_weights:
        llm = random_llm("smol", device)
        request = random_request(llm, 8, 45)
    else:
        llm, request = real_request(device)
    rows = []
    for n in args.clients:
        plain, batched, passes = 0.0, 0.0, 0
        for _ in range(args.repeats):  # alternate the modes so both see the same machine
            plain = max(plain, run(llm, False, n, args.steps, request, args.max_batch_tokens)[0])
            rate, passes = run(llm, True, n, args.steps, request, args.max_batch_tokens)
            batched = max(batched, rate)
        rows.append((n, plain, batched, passes, n * args.steps))
    emb = request[0]
    weights = "random weights" if args.random_weights else "real weights"
    print(
        f"\nSplit server throughput, SmolLM2-135M ({weights}) bf16 on {machine(device)}; batch {emb.shape[0]} x {emb.shape[1]} tokens "
        f"per step, {args.steps} steps per client, split.max_batch_tokens = {args.max_batch_tokens}\n"
    )
    print(
        "| concurrent clients | unbatched samples/s | micro-batched samples/s | batched vs unbatched | batched vs 1 client | LLM "
        "passes / steps (batched) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    one = rows[0][2]
    for n, plain, batched, passes, total in rows:
        print(f"| {n} | {plain:.1f} | {batched:.1f} | {batched / plain:.2f}x | {batched / one:.2f}x | {passes} / {total} |")


if __name__ == "__main__":
    main()

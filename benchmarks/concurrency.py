"""Split-server throughput with 1, 2, 4 and 8 concurrent clients, micro-batched vs not.

Each client is a thread with its own SplitClient and gRPC stream, sending real
training frames (SmolLM2-135M server in bf16, batch 8 easy-vqa samples, bf16
wire) back to back; the server either runs every step alone or merges the steps
that are waiting into one forward/backward. Both modes run in the same process,
alternating per client count (best of --repeats each), so they see the same machine.

    python benchmarks/concurrency.py [--steps 4] [--clients 1 2 4 8]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from fednano.config import RunConfig
from fednano.data.easyvqa import load_split
from fednano.models.bundle import load_nanoedge, load_server_llm
from fednano.prepare import ensure_prepared
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer
from fednano.training import ImageFeatures, Workload


def run(llm, batching: bool, n_clients: int, steps: int, batch) -> tuple[float, int]:
    """-> (samples per second, LLM passes)."""
    emb, mask, labels = batch
    with SplitServer(llm, batching=batching) as server:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per client (default 4)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="client counts to try")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repetitions per mode; the best of each is reported")
    args = ap.parse_args()
    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    work = Workload(client.tokenizer, ImageFeatures(client.edge.vision), client.edge.num_visual_tokens)
    tb, feats = work.train_batch(list(load_split("train")[:8]))
    with torch.no_grad():
        emb = client.edge.embed(tb.input_ids, feats)
    llm = load_server_llm(bundle, torch.bfloat16)
    rows = []
    data = (emb, tb.attention_mask, tb.labels)
    for n in args.clients:
        plain, batched, passes = 0.0, 0.0, 0
        for _ in range(args.repeats):  # alternate the modes so both see the same machine
            plain = max(plain, run(llm, False, n, args.steps, data)[0])
            rate, passes = run(llm, True, n, args.steps, data)
            batched = max(batched, rate)
        rows.append((n, plain, batched, passes, n * args.steps))
    print(f"\nSplit server throughput, SmolLM2-135M bf16, batch {emb.shape[0]} x {emb.shape[1]} tokens per step, {args.steps} steps per client\n")
    print("| concurrent clients | unbatched samples/s | micro-batched samples/s | ratio | LLM passes / steps (batched) |")
    print("|---:|---:|---:|---:|---:|")
    for n, plain, batched, passes, total in rows:
        print(f"| {n} | {plain:.1f} | {batched:.1f} | {batched / plain:.2f}x | {passes} / {total} |")


if __name__ == "__main__":
    main()

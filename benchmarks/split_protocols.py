"""What each split protocol (split.protocol) costs per training step, side by side in one run.

1. smol, real weights, the real gRPC channel on loopback (the default run's setting: SmolLM2-135M in bf16,
   NanoEdge in fp32, easy-vqa batches of 8): for each wire dtype and protocol, the bytes up and down of one
   training step (images already sent: the cached protocols' steady state), each image's one-off bytes, and
   the seconds of a whole split step (client forward, channel, server LLM, client backward). The protocols
   take turns within each repeat (median of --repeats), so all see the same machine.
   Then the rest of a client-round, per protocol: the Fisher pass (train.fisher_samples) and the local
   evaluation (64 questions), alternately, median of --repeats after a warm-up; with the step time, a
   client-round's time = local_steps x step + Fisher pass + evaluation.
2. LLaVA-1.5-7B shapes (8 x (576 + 64) tokens, d = 4096, r = 64, vocabulary 32000, random values): the bytes
   of one step from the frames each protocol really encodes, and the seconds of the protocol's own work
   (client: building and encoding the request, decoding the reply; server: decoding, assembling the
   embeddings from cached features, back-propagating into the adapters, encoding the reply). The LLM's
   forward and backward are the same in every protocol (benchmarks/server_step.py measures them) and are
   not run here.
3. Lossless compression of the real smol frames of part 1 (a request and its reply per protocol and wire):
   how much zlib (level 1) and zstd (level 3; `pip install zstandard==0.25.0`, not a FedNano dependency)
   shrink them, and at what speed on this CPU.

    python benchmarks/split_protocols.py [--repeats 5] [--big-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import torch
from common import machine

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.evaluation import evaluate
from fednano.client.features import ImageFeatures, Workload
from fednano.client.fisher import fisher_pass
from fednano.client.training import split_step
from fednano.config import RunConfig
from fednano.data import load_task
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import IGNORE_INDEX, IMAGE_PLACEHOLDER
from fednano.split.assembly import FeatureCache, assemble
from fednano.split.client import SplitClient
from fednano.split.frames import Frame, decode, encode
from fednano.split.parts import PROTOCOLS, EdgeParts
from fednano.split.server import SplitServer

WIRES = ("bfloat16", "float8_e4m3")


class Recording(SplitClient):
    """A SplitClient that keeps its last training request and reply as they crossed (for part 3)."""

    last: tuple[bytes, bytes] = (b"", b"")

    def request_bytes(self, data: bytes, op: str = "raw") -> Frame:
        reply = super().request_bytes(data, op)
        if op == "train":
            self.last = (data, encode(reply))
        return reply


def smol(repeats: int) -> None:
    cfg = RunConfig()
    bundle = ensure_prepared(cfg)
    side = load_nanoedge(bundle / "client", cfg.adapter)
    edge = side.edge
    with torch.no_grad():  # adapters as after some training (B = 0 at init would make NanoAdapter-I's gradient trivial)
        for p in edge.adapter_parameters().values():
            p.normal_(0, 0.02)
    work = Workload(side.tokenizer, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    by_image = {s.image_path: s for s in load_split("train")}
    samples = list(by_image.values())[: 8 * repeats]
    batches = [work.train_batch(samples[i : i + 8]) for i in range(0, len(samples), 8)]
    llm = load_server_llm(bundle, torch.bfloat16)
    rows, frames = [], []
    with SplitServer(llm, secret="bench") as server:  # each client its own id, so each sends its own images
        for wire in WIRES:
            clients = {p: Recording(server.address, wire, protocol=p, token=server.client_token(f"{wire}/{p}")) for p in PROTOCOLS}
            for c in clients.values():  # the images go up once (cached protocols), and everything is warm
                for batch, feats in batches:
                    split_step(edge, c, batch, feats)
            before = {p: (c.bytes_up["train"], c.bytes_down["train"]) for p, c in clients.items()}
            times: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
            for batch, feats in batches:
                for p, c in clients.items():
                    edge.zero_grad(set_to_none=True)
                    t = time.perf_counter()
                    split_step(edge, c, batch, feats)
                    times[p].append(time.perf_counter() - t)
            for p, c in clients.items():
                up, down = ((c.bytes_up["train"] - before[p][0]) / len(batches), (c.bytes_down["train"] - before[p][1]) / len(batches))
                image = c.bytes_up["features"] / max(1, len(samples))
                rows.append((wire, p, up, down, image, statistics.median(times[p])))
                frames.append((wire, p, *c.last))
                c.close()
    print(f"## smol (SmolLM2-135M bf16, real weights), batch 8, gRPC loopback — {machine(torch.device('cpu'))}\n")
    _table(rows)
    lossless(frames)
    step = {p: sec for wire, p, *_, sec in rows if wire == "bfloat16"}
    client_round(edge, work, llm, cfg, step, repeats)


def client_round(edge, work, llm, cfg, step: dict[str, float], repeats: int) -> None:
    """The Fisher pass and the local evaluation per protocol (bf16 wire), alternately; a client-round's time."""
    task = load_task(cfg)
    train, test = task.train[:400], task.test[:64]
    times: dict[tuple[str, str], list[float]] = {(p, w): [] for p in PROTOCOLS for w in ("fisher", "eval")}
    with SplitServer(llm) as server:
        clients = {p: SplitClient(server.address, "bfloat16", protocol=p) for p in PROTOCOLS}
        for rep in range(repeats + 1):  # the first is a warm-up (the cached protocols send their images then)
            for p, c in clients.items():
                t0 = time.perf_counter()
                fisher_pass(edge, c, train, work, cfg.train, torch.Generator().manual_seed(rep))
                t1 = time.perf_counter()
                evaluate(edge, c, test, work, task.candidate_sets, cfg.train.eval_batch_size)
                if rep:
                    times[(p, "fisher")].append(t1 - t0)
                    times[(p, "eval")].append(time.perf_counter() - t1)
        for c in clients.values():
            c.close()
    print(f"## smol: a client-round ({cfg.train.local_steps} steps, a {cfg.train.fisher_samples}-sample Fisher pass, "
          f"{len(test)} local test questions), bf16 wire\n")
    print("| protocol | step s | Fisher pass s | evaluation s | client-round s | vs activations |")
    print("|---|---:|---:|---:|---:|---:|")
    total = {p: cfg.train.local_steps * step[p] + statistics.median(times[(p, "fisher")]) + statistics.median(times[(p, "eval")])
             for p in PROTOCOLS}
    for p in PROTOCOLS:
        print(f"| `{p}` | {step[p]:.3f} | {statistics.median(times[(p, 'fisher')]):.2f} | {statistics.median(times[(p, 'eval')]):.2f} | "
              f"{total[p]:.1f} | {total[p] / total['activations']:.3f}x |")
    print()


def lossless(frames: list[tuple[str, str, bytes, bytes]]) -> None:
    try:
        import zstandard
    except ImportError:
        zstandard = None
    codecs = {"zlib-1": lambda b: zlib.compress(b, 1)}
    if zstandard is not None:
        codecs["zstd-3"] = zstandard.ZstdCompressor(level=3).compress
    print("## Lossless compression of real smol training frames (request + reply)\n")
    print("| wire | protocol | bytes | " + " | ".join(f"{c} size | {c} MB/s" for c in codecs) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(codecs))
    for wire, p, req, rep in frames:
        cells = []
        for fn in codecs.values():
            t = time.perf_counter()
            size = len(fn(req)) + len(fn(rep))
            cells += [f"{size / (len(req) + len(rep)):.3f}", f"{(len(req) + len(rep)) / (time.perf_counter() - t) / 1e6:,.0f}"]
        print(f"| {wire} | `{p}` | {len(req) + len(rep):,} | " + " | ".join(cells) + " |")
    print()


def _table(rows: list[tuple]) -> None:
    print("| wire | protocol | up / step | down / step | each image once | s / step | bytes vs activations | time vs activations |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base = {r[0]: r for r in rows if r[1] == "activations"}
    for wire, p, up, down, image, sec in rows:
        b = base[wire]
        print(f"| {wire} | `{p}` | {up / 2**10:,.1f} KiB | {down / 2**10:,.1f} KiB | {image / 2**10:,.1f} KiB | {sec:.3f} | "
              f"{(b[2] + b[3]) / (up + down):.2f}x fewer | {sec / b[5]:.2f}x |")
    print()


def big(repeats: int) -> None:
    """LLaVA-1.5-7B shapes: the frames of one step, and the protocol's own seconds (no LLM)."""
    B, N, text, d, r, vocab = 8, 576, 64, 4096, 64, 32000
    g = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding(vocab, d)
    ids = torch.randint(0, vocab, (B, N + text), generator=g)
    ids[:, 1 : 1 + N] = IMAGE_PLACEHOLDER
    visual = torch.randn(B, N, d, generator=g)
    encoded = torch.randn(B, N + 1, 1024, generator=g)  # CLIP ViT-L/14-336's features (with its class token): the images' keys
    adapters = {n: (torch.randn(r, d, generator=g) * 0.02, torch.randn(d, r, generator=g) * 0.02, 2.0) for n in ("adapter_i", "adapter_t")}
    embeds = torch.randn(B, N + text, d, generator=g)
    mask, labels = torch.ones(B, N + text, dtype=torch.long), torch.full((B, N + text), IGNORE_INDEX)
    labels[:, -4:] = 1
    rows = []
    for wire in WIRES:
        for p in PROTOCOLS:
            client = SplitClient("127.0.0.1:1", wire, protocol=p)  # never dials: only its frames are used
            cache = FeatureCache(2**34)
            parts = EdgeParts(ids, ids == IMAGE_PLACEHOLDER, adapters, lambda: visual, encoded)  # type: ignore[arg-type]
            if PROTOCOLS[p].caches_features:
                keys = parts.keys()
                cache.put("c", keys, decode(encode(Frame("f", {"x": visual.to(client.wire)}, {}, client._scaled("x")))).tensors["x"])
                client._held.update(keys)
            t_client, t_server, sizes = [], [], (0, 0)
            for _ in range(repeats):
                t0 = time.perf_counter()
                tensors, meta, scaled = client._inputs(embeds, parts)
                req = encode(Frame("train", {**tensors, "mask": mask.to(torch.uint8), "labels": labels.to(torch.int32)}, meta, scaled))
                t1 = time.perf_counter()
                frame = decode(req)
                if "embeds" in frame.tensors:
                    grad = frame.tensors["embeds"]  # stands in for the LLM's gradient (same shape and dtype)
                    back = {"grad": scaled["embeds"]} if scaled else {}
                    reply = encode(Frame("train", {"loss": torch.zeros(()), "grad": grad}, {}, back))
                else:
                    a = assemble(frame, "c", cache, table, train=True)
                    out = a.grads(torch.randn(a.embeds.shape, generator=g))
                    if "text" in frame.tensors:
                        out["grad_text"] = out["grad_text"].to(frame.tensors["text"].dtype)
                    back = {"grad_text": scaled["text"]} if "text" in scaled else {}
                    reply = encode(Frame("train", {"loss": torch.zeros(()), **out}, {}, back))
                t2 = time.perf_counter()
                decode(reply)
                t3 = time.perf_counter()
                t_client.append((t1 - t0) + (t3 - t2))
                t_server.append(t2 - t1)
                sizes = (len(req), len(reply))
            image = PROTOCOLS[p].image_bytes(_shape(B, N, text, d, r, wire))
            rows.append((wire, p, sizes[0], sizes[1], image, statistics.median(t_client) + statistics.median(t_server)))
    print(f"## LLaVA-1.5-7B shapes (8 x (576 + 64) tokens, d 4096, r 64): frames and the protocol's own seconds — "
          f"{machine(torch.device('cpu'))}\n")
    _table(rows)


def _shape(B: int, N: int, text: int, d: int, r: int, wire: str):
    from fednano.split.parts import StepShape

    return StepShape(B, N, text, d, r, 1 if wire.startswith(("float8", "int8")) else 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="smol: timed steps per protocol and wire (median)")
    ap.add_argument("--big-repeats", type=int, default=3, help="7B shapes: timed repetitions (median)")
    ap.add_argument("--skip-smol", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    if not a.skip_smol:
        smol(a.repeats)
    big(a.big_repeats)


if __name__ == "__main__":
    main()

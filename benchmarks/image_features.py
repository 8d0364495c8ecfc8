"""The frozen vision encoder (EfficientNet-Lite0, the smol default): one image at a time vs batched.

`training.ImageFeatures` encodes every image on its own. This measures what that costs
against batches of 8 and 32 (ms per image, best of --repeats, all sizes alternating in one
process so they share the machine), at 1 thread (a simulated client) and 2 (this machine's
cores), and whether a batch gives bit-identical features to one image at a time: the
reason for encoding images alone.

    python benchmarks/image_features.py [--images 64] [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from fednano.client.vision import build_vision_encoder
from fednano.data.easyvqa import load_image, load_split

SIZES = (1, 8, 32)


def encode(encoder, x: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """Features of every image of x, `size` at a time -> (features, seconds)."""
    t = time.perf_counter()
    with torch.no_grad():
        out = torch.cat([encoder.features(x[i : i + size]) for i in range(0, len(x), size)])
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="easy-vqa training images to encode (a multiple of 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per batch size; the best counts")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    args = ap.parse_args()
    encoder = build_vision_encoder({"type": "efficientnet-lite0"}, image_size=224, grid=3)
    x = torch.cat([encoder.preprocess(load_image(s.image_path).unsqueeze(0)) for s in load_split("train")[: args.images]])
    print(f"{args.images} easy-vqa images, EfficientNet-Lite0 at 224 px, best of {args.repeats}\n")
    print("| threads | batch | ms / image | time vs one at a time | bit-identical to one at a time |")
    print("|---:|---:|---:|---:|:---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in SIZES:  # warm-up
            encode(encoder, x[:size], size)
        best = {s: float("inf") for s in SIZES}
        feats = {}
        for _ in range(args.repeats):
            for size in SIZES:
                feats[size], sec = encode(encoder, x, size)
                best[size] = min(best[size], sec)
        for size in SIZES:
            same = torch.equal(feats[size], feats[1])
            diff = "" if same else f" (max diff {float((feats[size] - feats[1]).abs().max()):.1e})"
            print(
                f"| {threads} | {size} | {best[size] * 1000 / len(x):.1f} | {best[size] / best[1]:.2f}× | {'yes' if same else 'no' + diff} "
                f"|"
            )


if __name__ == "__main__":
    main()

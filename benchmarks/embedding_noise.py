"""What metric-DP noise on the text embeddings hides from the server (privacy.embedding_noise), level by level.

For each noise level, the ε it gives (per unit of L2 distance, and for a typical pair of tokens) and the share
of text tokens an honest-but-curious server still recovers by the nearest row of the embedding table, on the
training frames `privacy.audit_samples` samples of each client would produce under the paper's `activations`
split (the run config's wire dtype). The adapters are at their initialisation (NanoAdapter-T = identity: the
worst case, every token recoverable without noise), or a run's final ones with --run.

    python benchmarks/embedding_noise.py [--config configs/default.toml] [--levels 0,1,2,5,10,20,50] [--run RUN_DIR]

Accuracy under noise needs training runs: `fednano run --set 'split.protocol="activations"' --set privacy.embedding_noise=L`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from safetensors.torch import load_file

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.client.features import ImageFeatures, Workload
from fednano.config import load_config
from fednano.data import system_prompt
from fednano.devices import dtype_of
from fednano.leakage import RoundAudit
from fednano.privacy import embedding_privacy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml", help="run config (its data, partition and wire dtype)")
    ap.add_argument("--levels", default="0,1,2,5,10,20,50", help="privacy.embedding_noise levels, comma-separated")
    ap.add_argument("--run", type=Path, help="a results folder: audit its final adapters instead of the initial ones")
    args = ap.parse_args()
    cfg = load_config(args.config, {"split.protocol": "activations"})
    bundle = ensure_prepared(cfg)
    side = load_nanoedge(bundle / "client", cfg.adapter)
    if args.run:
        side.edge.load_adapter_state(load_file(args.run / "adapters.safetensors"))
    table = load_server_llm(bundle, dtype_of(cfg.model.llm_dtype)).model.get_input_embeddings().weight.detach()
    work = Workload(side.tokenizer, ImageFeatures(side.edge.vision), side.edge.num_visual_tokens, system_prompt(cfg.data.dataset))
    print(f"adapters: {'final of ' + str(args.run) if args.run else 'at initialisation (NanoAdapter-T = identity)'}; "
          f"wire {cfg.split.wire_dtype}; {cfg.privacy.audit_samples} training samples per client\n")
    print("| embedding_noise (E‖z‖ / median row norm) | ε per unit distance | ε, typical token pair | text tokens recovered |")
    print("|---:|---:|---:|---:|")
    for level in (float(x) for x in args.levels.split(",")):
        c = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, embedding_noise=level))
        found = RoundAudit(c, side.edge, work, table)()
        eps = embedding_privacy(level, side.edge.embed_tokens.weight.detach()) if level else None
        print(f"| {level:g} | {eps['epsilon_per_unit_distance']:.1f} | {eps['epsilon_typical_token_pair']:.1f} | "
              if eps else "| 0 | ∞ | ∞ | ", end="")
        print(f"{found['text_tokens_recovered']:.3f} of {found['text_tokens']} |")


if __name__ == "__main__":
    main()

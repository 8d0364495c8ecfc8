"""`fednano prepare`: assemble the MLLM and pre-train its connector once, centrally.

Like LLaVA's stage-1 feature alignment: the vision encoder and the LLM stay
frozen, the connector learns to map visual features into the LLM's embedding
space from image-caption pairs. The pairs come from easy-vqa train images held
out from federated training (`prepare.caption_images`); the federated clients
never see those images. The result is cached under the cache dir, keyed by
every setting that changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from fednano.config import AdapterConfig, RunConfig
from fednano.data.easyvqa import captions, held_out_image_ids, load_split, vocabulary_words
from fednano.data.prompts import SYSTEM_PROMPT, training_batch
from fednano.models.bundle import build_tiny_llm, convert_smollm2, load_llm, write_client_bundle
from fednano.models.connector import Connector
from fednano.models.nanoedge import NanoEdge
from fednano.models.server_llm import ServerLLM
from fednano.models.vision import TinyCNN, build_vision_encoder
from fednano.progress import progress_bar
from fednano.training import ImageFeatures, split_step

log = logging.getLogger(__name__)

CAPTION_SYSTEM = "Describe the image in a few words."
CAPTION_QUESTION = "What is in the image?"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def bundle_dir(cfg: RunConfig) -> Path:
    key = {"model": {k: getattr(cfg.model, k) for k in ("backbone", "visual_grid", "image_size")}, "prepare": cfg.prepare.__dict__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return cfg.model.resolved_cache_dir / f"{cfg.model.backbone}-{digest}"


def ensure_prepared(cfg: RunConfig) -> Path:
    out = bundle_dir(cfg)
    if (out / "prepare.json").exists():
        return out
    return prepare(cfg)


def _tiny_words() -> list[str]:
    text = " ".join([SYSTEM_PROMPT, CAPTION_SYSTEM, CAPTION_QUESTION, "system user assistant a"])
    return vocabulary_words() + re.findall(r"\w+|[^\w\s]+", text.lower())


def prepare(cfg: RunConfig) -> Path:
    """Build the bundle (client/ + server.json) and pre-train the connector."""
    t0 = time.time()
    out = bundle_dir(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    p = cfg.prepare
    log.info("preparing backbone %r into %s", cfg.model.backbone, out)

    if cfg.model.backbone == "smol":
        llm_dir = convert_smollm2(cfg.model.resolved_cache_dir / "smollm2-135m-instruct")
        llm_ref = str(llm_dir)
        vision_spec, vision_state = {"type": "efficientnet-lite0"}, None
    else:  # tiny: random weights built from config (tests)
        llm_dir = build_tiny_llm(tmp / "llm", _tiny_words(), seed=p.seed)
        llm_ref = "llm"
        torch.manual_seed(p.seed)
        vision_spec, vision_state = {"type": "tiny-cnn", "channels": 16}, TinyCNN(16).state_dict()

    model, tokenizer = load_llm(llm_dir)
    embed_weight = model.get_input_embeddings().weight.detach().float().clone()  # (V, d)
    llm = ServerLLM(model, DTYPES[cfg.model.llm_dtype])
    vision = build_vision_encoder(vision_spec, cfg.model.image_size, cfg.model.visual_grid, vision_state)
    torch.manual_seed(p.seed)
    connector = Connector(vision.feature_dim, embed_weight.shape[1])
    edge = NanoEdge(vision, connector, nn.Embedding.from_pretrained(embed_weight, freeze=True), AdapterConfig())
    edge.connector.requires_grad_(True)  # stage 1: only the connector trains

    held = held_out_image_ids(p.caption_images, p.seed)
    pairs = list(captions(load_split("train"), held).values())
    features = ImageFeatures(vision)
    opt = torch.optim.AdamW(edge.connector.parameters(), lr=p.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, p.steps))
    rng = random.Random(p.seed)
    losses: list[float] = []
    with progress_bar(p.steps, "pre-training connector") as bar:
        for _ in range(p.steps):
            part = rng.sample(pairs, min(p.batch_size, len(pairs)))
            batch = training_batch(tokenizer, [CAPTION_QUESTION] * len(part), [c for _, c in part], vision.num_tokens, system=CAPTION_SYSTEM)
            opt.zero_grad(set_to_none=True)
            losses.append(split_step(edge, llm, batch, features([path for path, _ in part])))
            opt.step()
            sched.step()
            bar.update(1, loss=losses[-1])

    meta = {"backbone": cfg.model.backbone, "hidden_size": int(embed_weight.shape[1]), "vocab_size": int(embed_weight.shape[0]),
            "visual_grid": cfg.model.visual_grid, "image_size": cfg.model.image_size}
    write_client_bundle(tmp / "client", vision_spec=vision_spec, vision_state=vision_state, connector=edge.connector,
                        embed_weight=embed_weight, tokenizer=tokenizer, meta=meta)
    (tmp / "server.json").write_text(json.dumps({"llm_dir": llm_ref}))
    window = max(1, min(10, len(losses)))
    report = {
        "config": {"model": cfg.model.__dict__, "prepare": p.__dict__},
        "caption_pairs": len(pairs), "held_out_images": sorted(held),
        "caption_loss_first": sum(losses[:window]) / window if losses else None,
        "caption_loss_last": sum(losses[-window:]) / window if losses else None,
        "seconds": round(time.time() - t0, 1),
    }
    (tmp / "prepare.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("prepared %s in %.0f s (caption loss %.3f -> %.3f)", out, report["seconds"], report["caption_loss_first"] or 0, report["caption_loss_last"] or 0)
    return out

"""`fednano prepare`: turn a backbone into a bundle (client part + server part), once.

What differs between backbones is in their registry entries (backbones/registry.py); this module holds what
they share.

* smol / tiny / compose: assemble vision encoder + MLP connector + causal LM and
  pre-train the connector centrally, like LLaVA's stage-1 feature alignment (the
  encoder and the LLM stay frozen) on image-caption pairs from easy-vqa train
  images held out from federated training (`prepare.caption_images`): the
  federated clients never see those images. `smol` is `compose` with SmolLM2
  from its package; `tiny` is `compose` with random tiny models.
* llava / blip2: split an existing HF checkpoint (its connector is trained already).

The result is cached under the cache dir, keyed by every setting that changes it; its client part is
sealed with a content digest (backbones/digest.py), which is what nodes and results name. Only the side
that holds the LLM prepares: nodes receive the client part (`fednano bundle`, or the split channel).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from fednano.backbones.bundle import input_embedding_weight, load_llm, write_compose_bundle
from fednano.backbones.digest import MANIFEST, seal
from fednano.backbones.registry import BACKBONES
from fednano.client.connector import Connector
from fednano.client.features import ImageFeatures
from fednano.client.nanoedge import NanoEdge
from fednano.client.training import split_step
from fednano.client.vision import build_vision_encoder
from fednano.config import AdapterConfig, RunConfig
from fednano.data.easyvqa import captions, held_out_image_ids, load_split
from fednano.data.prompts import training_batch
from fednano.data.samples import IMAGE_MARK
from fednano.devices import dtype_of, resolve_device
from fednano.progress import progress_bar
from fednano.server.llm import ServerLLM

log = logging.getLogger(__name__)

CAPTION_SYSTEM = "Describe the image in a few words."
CAPTION_QUESTION = "What is in the image?"
# Bumped when what stage-1 pre-training computes changes, so that no cache holds a connector trained
# against other numerics. 2: the LLM is loaded straight into bf16, which keeps its rotary frequencies
# in float32 (casting a float32 model to bf16, as before, rounded them to bf16 too).
COMPOSE_VERSION = 2


def bundle_dir(cfg: RunConfig) -> Path:
    key = BACKBONES[cfg.model.backbone].cache_key(cfg)  # every setting the bundle depends on
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return cfg.model.resolved_cache_dir / f"{cfg.model.backbone}-{digest}"


def ensure_prepared(cfg: RunConfig) -> Path:
    out = bundle_dir(cfg)
    if (out / "prepare.json").exists():
        if not (out / "client" / MANIFEST).exists():  # prepared before bundles had digests
            seal(out / "client")
        return out
    return prepare(cfg)


def prepare(cfg: RunConfig) -> Path:
    """Build the bundle (client/ + server.json + prepare.json) for `cfg.model.backbone`."""
    t0 = time.time()
    out = bundle_dir(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = cfg.model
    log.info("preparing backbone %r into %s", m.backbone, out)
    server, report = BACKBONES[m.backbone].prepare(cfg, tmp)
    (tmp / "server.json").write_text(json.dumps(server))
    # the client bundle's content digest: nodes receive exactly these files, and every message names it
    report = {"backbone": m.backbone, "config": {"model": m.__dict__, "prepare": cfg.prepare.__dict__}, **report,
              "client_digest": seal(tmp / "client"), "seconds": round(time.time() - t0, 1)}
    (tmp / "prepare.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("prepared %s in %.0f s", out, report["seconds"])
    return out


def prepare_compose(cfg: RunConfig, client_dir: Path, llm_dir: Path, vision_spec: dict, vision_state: dict | None) -> dict:
    """Stage-1 alignment: train the connector between a frozen encoder and a frozen LLM."""
    p = cfg.prepare
    device = resolve_device(cfg.model.server_device, "model.server_device")  # stage 1 is central: it runs where the LLM runs
    model, tokenizer = load_llm(llm_dir, dtype_of(cfg.model.llm_dtype), device)
    embed_weight = input_embedding_weight(model, llm_dir)  # (V, d) float32, as stored
    llm = ServerLLM(model, dtype_of(cfg.model.llm_dtype))
    vision = build_vision_encoder(vision_spec, cfg.model.image_size, cfg.model.visual_grid, vision_state)
    torch.manual_seed(p.seed)
    connector = Connector(vision.feature_dim, embed_weight.shape[1])
    edge = NanoEdge(vision, connector, nn.Embedding.from_pretrained(embed_weight, freeze=True), AdapterConfig()).to(device)
    edge.connector.requires_grad_(True)  # stage 1: only the connector trains (an MLP: no dropout, no norm)

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
            content = f"{IMAGE_MARK}\n{CAPTION_QUESTION}"
            batch = training_batch(tokenizer, [content] * len(part), [c for _, c in part], vision.num_tokens, system=CAPTION_SYSTEM)
            opt.zero_grad(set_to_none=True)
            losses.append(split_step(edge, llm, batch, features([path for path, _ in part])))
            opt.step()
            sched.step()
            bar.update(1, loss=losses[-1])

    meta = {"hidden_size": int(embed_weight.shape[1]), "vocab_size": int(embed_weight.shape[0]),
            "visual_grid": cfg.model.visual_grid, "image_size": cfg.model.image_size}
    write_compose_bundle(client_dir, vision_spec=vision_spec, vision_state=vision_state, connector=edge.connector,
                         embed_weight=embed_weight, tokenizer=tokenizer, meta=meta)
    window = max(1, min(10, len(losses)))
    first = sum(losses[:window]) / window if losses else None
    last = sum(losses[-window:]) / window if losses else None
    log.info("connector pre-training: caption loss %.3f -> %.3f over %d steps", first or 0, last or 0, len(losses))
    return {"caption_pairs": len(pairs), "held_out_images": sorted(held), "caption_loss_first": first, "caption_loss_last": last}

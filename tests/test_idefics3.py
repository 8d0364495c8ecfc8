"""Idefics3 (SmolVLM), the backbone added as one file: a tiny random checkpoint built from the real configuration
class, split by FedNano, must compute the unsplit HF model's loss and adapter gradients."""

from pathlib import Path

import pytest
import torch

from fednano.backbones.bundle import load_hf_mllm, load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.registry import BACKBONES
from fednano.backbones.tiny import HIDDEN, tiny_llama_config, tiny_tokenizer
from fednano.client.features import ImageFeatures
from fednano.client.training import split_step
from fednano.config import load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_image, load_split
from fednano.data.prompts import IMAGE_PLACEHOLDER, training_batch
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer
from tests.conftest import TINY, randomize_adapters

IMAGE, PATCH, SCALE = 32, 8, 2  # 4 x 4 patches, pixel-shuffled 2 x 2 -> 4 visual tokens of 4 * HIDDEN features each


def build_tiny_idefics3(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random Idefics3ForConditionalGeneration checkpoint (SigLIP-style tower + Llama), saved with its tokenizer."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    tok = tiny_tokenizer(chat_template=False, extra_specials=("<image>",))
    vision = Idefics3VisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE, patch_size=PATCH)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=tiny_llama_config(tok).to_dict(), scale_factor=SCALE,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_idefics3(tmp_path_factory.mktemp("idefics3") / "ckpt")


def _cfg(tiny_cache, checkpoint, **more):
    return load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "idefics3", "model.checkpoint": str(checkpoint),
                              **more})


@pytest.mark.parametrize("randomized", [False, True], ids=["zero-init", "trained"])
def test_split_idefics3_equals_the_unsplit_hf_model(checkpoint, tiny_cache, randomized):
    # Prepare: the split model (FedNano's bundle) and the whole HF model with the adapters spliced in by hooks
    cfg = _cfg(tiny_cache, checkpoint)
    bundle = ensure_prepared(cfg)
    client = load_nanoedge(bundle / "client", cfg.adapter)
    edge, tok = client.edge, client.tokenizer
    assert edge.num_visual_tokens == (IMAGE // PATCH) ** 2 // SCALE**2
    if randomized:
        randomize_adapters(edge)
    samples = list(load_split("train")[:3])
    batch = training_batch(tok, [s.content() for s in samples], [s.answer for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
    hf, _ = load_hf_mllm(checkpoint, "idefics3")
    hf.eval()
    hooks = [hf.model.connector.register_forward_hook(lambda m, i, o: edge.adapter_i(o)),
             hf.get_input_embeddings().register_forward_hook(lambda m, i, o: edge.adapter_t(o))]
    ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_PLACEHOLDER, hf.config.image_token_id)
    pixels = edge.vision.preprocess(torch.stack([load_image(s.image_path) for s in samples]))[:, None]  # (B, 1 image, 3, H, W)

    # Execute: the unsplit forward and backward, then one split step through the channel
    out = hf(input_ids=ids, pixel_values=pixels, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    ref = {k: p.grad.clone() for k, p in edge.adapter_parameters().items()}
    for h in hooks:
        h.remove()
    edge.zero_grad(set_to_none=True)
    llm = load_server_llm(bundle, torch.float32)
    with SplitServer(llm) as server, SplitClient(server.address, wire_dtype="float32") as split:
        loss = split_step(edge, split, batch, ImageFeatures(edge.vision)([s.image_path for s in samples]))

    # Assert
    assert loss == pytest.approx(out.loss.item(), abs=1e-5)
    for k, g in ref.items():
        torch.testing.assert_close(edge.adapter_parameters()[k].grad, g, atol=1e-5, rtol=1e-4)
    assert ref["adapter_i.B.weight"].abs().sum() > 0 and ref["adapter_t.B.weight"].abs().sum() > 0
    assert llm.model.model.vision_model is None and llm.model.model.connector is None  # the server holds no client part


def test_idefics3_is_a_registered_hf_family_with_random_weights_at_its_shape(checkpoint, tiny_cache):
    family = BACKBONES["idefics3"]
    assert family.client_kind == family.server_kind == "idefics3"
    bundle = ensure_prepared(_cfg(tiny_cache, checkpoint, **{"model.random_init": True}))
    edge = load_nanoedge(bundle / "client", load_config(TINY).adapter).edge
    assert edge.num_visual_tokens == 4 and edge.embed_tokens.weight.shape[1] == HIDDEN
    llm = load_server_llm(bundle, torch.float32)
    assert llm.hidden_size == HIDDEN


def test_an_exported_idefics3_gives_fednanos_logits_with_plain_transformers(checkpoint, tiny_cache, tmp_path):
    from transformers import Idefics3ForConditionalGeneration

    from fednano.export import export_model
    from tests.test_export import _trained, _untuned_logits

    # Prepare: the split model with trained adapters, and its logits
    cfg = _cfg(tiny_cache, checkpoint)
    edge, samples, batch, ref = _trained(cfg)
    # Execute: fold them into a standard checkpoint, loaded with plain transformers
    hf = Idefics3ForConditionalGeneration.from_pretrained(export_model(cfg, edge.adapter_state(), tmp_path / "export")).eval()
    ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_PLACEHOLDER, hf.config.image_token_id)
    pixels = edge.vision.preprocess(torch.stack([load_image(s.image_path) for s in samples]))[:, None]
    with torch.no_grad():
        got = hf(input_ids=ids, pixel_values=pixels, attention_mask=batch.attention_mask).logits
    # Assert
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)
    assert (ref[mask] - _untuned_logits(cfg, batch, samples)[mask]).abs().max() > 1e-2  # the adapters matter

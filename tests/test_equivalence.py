"""The split is exact: adapter gradients through the gRPC channel equal those of the
same MLLM run unsplit in one process (the HF model computing its own loss)."""

import pytest
import torch

from fednano.backbones.bundle import load_llm
from fednano.client.features import ImageFeatures
from fednano.client.fisher import empirical_fisher
from fednano.client.training import split_step
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import training_batch
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer
from tests.conftest import randomize_adapters


def _batch(bundle, n=3):
    samples = list(load_split("train")[:n])
    tok, edge = bundle.tokenizer, bundle.edge
    batch = training_batch(tok, [s.content() for s in samples], [s.answer for s in samples], edge.num_visual_tokens, SYSTEM_PROMPT)
    feats = ImageFeatures(edge.vision)([s.image_path for s in samples])
    return batch, feats


def _unsplit_grads(edge, hf_model, batch, feats):
    """Reference: the whole MLLM in one process; HF computes the loss over the full vocabulary."""
    edge.zero_grad(set_to_none=True)
    embeds = edge.embed(batch.input_ids, feats)
    out = hf_model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(embeds.device), labels=batch.labels.to(embeds.device))
    out.loss.backward()
    return out.loss.item(), {k: p.grad.clone() for k, p in edge.adapter_parameters().items()}


@pytest.mark.parametrize("randomized", [False, True], ids=["zero-init", "trained"])
def test_split_gradients_equal_unsplit(tiny_bundle, tiny_edge_on, tiny_llm_on, device, randomized):
    """On every available device: client and server LLM there, the wire in between."""
    edge = tiny_edge_on.edge
    if randomized:
        randomize_adapters(edge)
    hf_model, _ = load_llm(tiny_bundle / "llm", device=device)
    hf_model.eval()
    batch, feats = _batch(tiny_edge_on)
    assert feats.device.type == device.type  # the image-feature cache lives with the NanoEdge
    ref_loss, ref = _unsplit_grads(edge, hf_model, batch, feats)

    with SplitServer(tiny_llm_on) as server, SplitClient(server.address, wire_dtype="float32") as client:
        edge.zero_grad(set_to_none=True)
        loss = split_step(edge, client, batch, feats)
    got = {k: p.grad for k, p in edge.adapter_parameters().items()}

    assert loss == pytest.approx(ref_loss, abs=1e-5)
    for k in ref:
        assert got[k].device.type == device.type
        assert ref[k].abs().max() > 0 or not randomized
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    # the LLM got no gradients
    assert all(p.grad is None for p in tiny_llm_on.model.parameters())


def test_split_fisher_equals_per_sample_unsplit_fisher(tiny_bundle, tiny_edge, tiny_llm):
    edge = tiny_edge.edge
    randomize_adapters(edge, seed=1)
    hf_model, _ = load_llm(tiny_bundle / "llm")
    batch, feats = _batch(tiny_edge, n=3)
    # reference: one unsplit backward per sample of its summed NLL, squared, averaged
    ref = {k: torch.zeros_like(p) for k, p in edge.adapter_parameters().items()}
    for i in range(3):
        edge.zero_grad(set_to_none=True)
        embeds = edge.embed(batch.input_ids[i : i + 1], feats[i : i + 1])
        logits = hf_model(inputs_embeds=embeds, attention_mask=batch.attention_mask[i : i + 1]).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], batch.labels[i, 1:], ignore_index=-100, reduction="sum")
        nll.backward()
        for k, p in edge.adapter_parameters().items():
            ref[k] += p.grad**2 / 3
    with SplitServer(tiny_llm) as server, SplitClient(server.address, wire_dtype="float32") as client:
        fisher, n = empirical_fisher(edge, client, [(batch, feats)])
    assert n == 3
    for k in ref:
        torch.testing.assert_close(fisher[k], ref[k], atol=1e-7, rtol=1e-4)

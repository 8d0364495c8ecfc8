"""The label-private (U-shaped) split: the labels stay on the client, the gradients are the standard split's, and
a server that knows the head still reads the labels from the gradients it gets back."""

import json

import pytest
import torch
import torch.nn.functional as F

from fednano.client.features import ImageFeatures
from fednano.config import ConfigError, load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import IGNORE_INDEX, training_batch
from fednano.split.client import SplitChannelError, SplitClient
from fednano.split.frames import Frame
from fednano.split.label_private import LabelPrivateClient, head_loss, labels_from_gradients
from fednano.split.server import SplitServer
from tests.conftest import TINY, randomize_adapters, run_tiny


def _batch(bundle, n=3):
    samples = list(load_split("train")[:n])
    edge = bundle.edge
    batch = training_batch(bundle.tokenizer, [s.content() for s in samples], [s.answer for s in samples], edge.num_visual_tokens,
                           SYSTEM_PROMPT)
    with torch.no_grad():
        embeds = edge.embed(batch.input_ids, ImageFeatures(edge.vision)([s.image_path for s in samples]))
    return batch, embeds


@pytest.mark.parametrize("randomized", [False, True], ids=["zero-init", "trained"])
def test_label_private_gradients_equal_the_standard_split(tiny_edge, tiny_llm, randomized):
    if randomized:
        randomize_adapters(tiny_edge.edge)
    batch, embeds = _batch(tiny_edge)
    head = tiny_edge.edge.embed_tokens.weight.detach()
    with SplitServer(tiny_llm) as server, SplitClient(server.address, wire_dtype="float32") as plain, \
            LabelPrivateClient(server.address, wire_dtype="float32", head=head) as private:
        for reduction in ("mean", "sum"):
            loss, grad, n = plain.train_step(embeds, batch.attention_mask, batch.labels, reduction)
            p_loss, p_grad, p_n = private.train_step(embeds, batch.attention_mask, batch.labels, reduction)
            assert p_n == n and p_loss.item() == pytest.approx(loss.item(), rel=1e-5)
            torch.testing.assert_close(p_grad, grad, atol=1e-5, rtol=1e-4)
        assert private.calls["train"] == 0 and private.calls["hidden"] == private.calls["hidden_grad"] == 2  # no labels went up
        assert private.traffic()["activations_up"] > plain.traffic()["activations_up"]  # the embeddings go up twice a step


def test_a_server_that_knows_the_head_reads_every_label_from_the_gradients(tiny_edge, tiny_llm):
    """The known-head attack on exactly what the server holds: the hidden states it sent and the gradient it got."""
    randomize_adapters(tiny_edge.edge)
    batch, embeds = _batch(tiny_edge)
    targets = batch.labels[:, 1:]
    sel = targets != IGNORE_INDEX
    positions = F.pad(sel, (0, 1), value=False)
    hidden = tiny_llm.hidden_states(embeds, batch.attention_mask, positions)
    _, grad_hidden = head_loss(hidden, targets[sel], tiny_edge.edge.embed_tokens.weight.detach(), "mean")  # the client's side
    read = labels_from_gradients(hidden, grad_hidden, tiny_llm.head.weight.detach(), scale=1 / int(sel.sum()))  # the server's
    assert torch.equal(read, targets[sel])


def test_malformed_label_private_frames_are_refused(tiny_llm):
    d = tiny_llm.hidden_size
    emb, mask = torch.randn(1, 4, d), torch.ones(1, 4, dtype=torch.uint8)
    pos = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
    with SplitServer(tiny_llm) as server, SplitClient(server.address, wire_dtype="float32") as client:
        cases = [
            (Frame("hidden", {"embeds": emb, "mask": mask, "positions": torch.zeros(1, 4, dtype=torch.uint8)}), "no position asked for"),
            (Frame("hidden", {"embeds": emb, "mask": mask, "positions": pos[:, :3]}), "tensor positions: shape"),
            (Frame("hidden_grad", {"embeds": emb, "mask": mask, "positions": pos, "grad_hidden": torch.zeros(3, d)}), "grad_hidden: shape"),
            (Frame("hidden_grad", {"embeds": emb, "mask": mask, "positions": pos, "grad_hidden": torch.full((2, d), float("nan"))}),
             "NaN or Inf"),
        ]
        for frame, needle in cases:
            with pytest.raises(SplitChannelError, match=needle) as err:
                client.request(frame)
            assert err.value.status == "INVALID_ARGUMENT"
        assert client.hidden(emb, mask, pos.bool()).shape == (2, d)  # the stream still serves


def test_label_private_needs_the_activations_protocol():
    with pytest.raises(ConfigError, match="split.label_private: the U-shaped split needs split.protocol = 'activations'"):
        load_config(TINY, {"split.label_private": True})


def test_a_label_private_run_completes_and_its_audit_runs_the_gradient_attack(tiny_bundle, tiny_cache, tmp_path):
    out = tmp_path / "run"
    sets = ["split.label_private=true", 'split.protocol="activations"', "federation.rounds=1", "privacy.audit=true",
            "privacy.audit_samples=4", "privacy.audit_pool=20"]
    proc = run_tiny(tiny_cache, out, *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    r = res["rounds"][0]
    assert r["aggregated"] and r["bytes"]["activations_up"] > 0 and r["bytes"]["fisher_up"] > 0 and r["train_loss"] > 0
    # no label crossed in the clear, and the server read them all from the gradients (the audit's attack)
    assert res["zero_shot_leakage"]["answer_tokens_in_clear"] == 1.0 and r["leakage"]["answer_tokens_in_clear"] == 1.0


def test_gradient_noise_is_scaled_to_each_position_and_needs_the_label_private_split():
    from fednano.split.label_private import noised_gradient

    g = torch.cat([torch.full((1, 400), 1.0), torch.full((1, 400), 0.01)])  # two positions, norms 20 and 0.2
    z = noised_gradient(g, 0.5, torch.Generator().manual_seed(0)) - g
    assert z.norm(dim=1).tolist() == pytest.approx([0.5 * 20, 0.5 * 0.2], rel=0.1)  # about level x each row's norm
    assert torch.equal(noised_gradient(g, 0.5, torch.Generator().manual_seed(0)), g + z)  # seeded
    with pytest.raises(ConfigError, match="privacy.gradient_noise: noise on the hidden states' gradient needs split.label_private"):
        load_config(TINY, {"privacy.gradient_noise": 1.0})

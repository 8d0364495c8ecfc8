"""The cached split protocols (split.parts) change the bytes, not the gradients: a step, a Fisher pass,
scores and answers through `cached-features` and `cached-features+ids` equal the `activations` protocol's
(float32, 1e-5) on every backbone, and the server keeps each image once."""

import pytest
import torch

from fednano.backbones.bundle import load_nanoedge, load_server_llm
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.tiny import build_tiny_blip2, build_tiny_llava
from fednano.client.features import ImageFeatures
from fednano.client.fisher import empirical_fisher
from fednano.client.training import split_step
from fednano.config import SplitConfig, load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_split
from fednano.data.prompts import candidate_batch, prompt_batch, stop_tokens, training_batch
from fednano.split.client import SplitChannelError, SplitClient
from fednano.split.endpoint import Decoding
from fednano.split.frames import Frame
from fednano.split.parts import PROTOCOLS
from fednano.split.server import SplitServer
from tests.conftest import TINY, randomize_adapters

CACHED = ["cached-features", "cached-features+ids"]


def _bundle(backbone, tiny_cache, tmp_path):
    sets = {"model.cache_dir": str(tiny_cache)}
    if backbone != "tiny":
        builder = build_tiny_llava if backbone == "llava" else build_tiny_blip2
        sets |= {"model.backbone": backbone, "model.checkpoint": str(builder(tmp_path / backbone))}
    cfg = load_config(TINY, sets)
    path = ensure_prepared(cfg)
    return load_nanoedge(path / "client", cfg.adapter), load_server_llm(path, torch.float32)


def _batches(bundle, n=3):
    by_image = {s.image_path: s for s in load_split("train")}  # questions share images: one question per image
    samples = list(by_image.values())[: 2 * n]
    tok, edge = bundle.tokenizer, bundle.edge
    feats = ImageFeatures(edge.vision)
    out = []
    for part in (samples[:n], samples[n:]):
        batch = training_batch(tok, [s.content() for s in part], [s.answer for s in part], edge.num_visual_tokens, SYSTEM_PROMPT)
        out.append((batch, feats([s.image_path for s in part])))
    return out, samples


def _step(edge, client, batch, feats):
    edge.zero_grad(set_to_none=True)
    loss = split_step(edge, client, batch, feats)
    return loss, {k: p.grad.clone() for k, p in edge.adapter_parameters().items()}


@pytest.mark.parametrize("backbone", ["tiny", "llava", "blip2"])
def test_cached_protocols_give_the_activations_protocols_gradients_scores_and_answers(backbone, tiny_cache, tmp_path):
    bundle, llm = _bundle(backbone, tiny_cache, tmp_path)
    edge = bundle.edge
    randomize_adapters(edge)
    (batch, feats), _ = _batches(bundle)[0]
    prompts = prompt_batch(bundle.tokenizer, ["<image>\nwhat shape?"] * 3, edge.num_visual_tokens, SYSTEM_PROMPT)
    cands = candidate_batch(bundle.tokenizer, ["circle", "red", "yes"])
    results = {}
    with SplitServer(llm) as server:
        for protocol in PROTOCOLS:
            with SplitClient(server.address, wire_dtype="float32", protocol=protocol) as client:
                loss, grads = _step(edge, client, batch, feats)
                fisher, _ = empirical_fisher(edge, client, [(batch, feats)])
                with torch.no_grad():
                    x, parts = edge.embed(prompts.input_ids, feats), edge.parts(prompts.input_ids, feats)
                    c = edge.embed(cands.input_ids, None)
                    lp = client.score(x, prompts.attention_mask, c, cands.input_ids, cands.attention_mask, parts=parts)
                    answers = client.generate(x, prompts.attention_mask, edge.text_adapter(), stop_tokens(bundle.tokenizer), Decoding(6),
                                              parts=parts)
                results[protocol] = (loss, grads, fisher, lp, answers, client.traffic())
    ref_loss, ref_grads, ref_fisher, ref_lp, ref_answers, ref_bytes = results["activations"]
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for protocol in CACHED:
        loss, grads, fisher, lp, answers, traffic = results[protocol]
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=f"{protocol} {k}")
            torch.testing.assert_close(fisher[k], ref_fisher[k], atol=1e-7, rtol=1e-4, msg=f"{protocol} Fisher {k}")
        torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
        assert answers == ref_answers
        # fewer bytes per step: the visual tokens went up once, as features
        assert traffic["features_up"] > 0 and traffic["activations_up"] < ref_bytes["activations_up"]
        assert traffic["gradients_down"] < ref_bytes["gradients_down"]
    assert results["cached-features+ids"][5]["activations_up"] < results["cached-features"][5]["activations_up"]


def test_each_image_goes_up_once_and_again_after_the_server_forgets_it(tiny_edge, tiny_llm):
    edge = tiny_edge.edge
    randomize_adapters(edge)
    (b1, f1), (b2, f2) = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm) as server, SplitClient(server.address, wire_dtype="float32", protocol="cached-features") as client:
        _, ref = _step(edge, client, b1, f1)
        sent = client.traffic()["features_up"]
        _step(edge, client, b1, f1)
        assert client.traffic()["features_up"] == sent  # the same images: nothing new went up
        _step(edge, client, b2, f2)
        assert client.traffic()["features_up"] > sent
        server.service.features = type(server.service.features)(server.service.features.max_bytes)  # as after a restart
        before = client.traffic()["features_up"]
        _, again = _step(edge, client, b1, f1)
        assert client.traffic()["features_up"] > before  # NOT_FOUND, sent again, answered
        for k in ref:
            torch.testing.assert_close(again[k], ref[k], atol=1e-6, rtol=1e-5)


def test_a_fresh_client_process_does_not_send_what_the_server_holds(tiny_edge, tiny_llm):
    """A deployed node starts a fresh process per message: its new SplitClient asks which images the server
    lacks (a few bytes a key) instead of sending them all again."""
    edge = tiny_edge.edge
    (b1, f1), _ = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm) as server:
        with SplitClient(server.address, "float32", protocol="cached-features") as first:
            _step(edge, first, b1, f1)
            sent = first.traffic()["features_up"]
        with SplitClient(server.address, "float32", protocol="cached-features") as second:
            _step(edge, second, b1, f1)
            asked = second.traffic()["features_up"]
    assert 0 < asked < 400 < sent  # one small question; the first sent 3 images' features
    assert server.service.features.stats["stored"] == 3


def test_a_cache_too_small_for_one_batch_is_a_clear_error(tiny_edge, tiny_llm):
    (b1, f1), _ = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm, SplitConfig(feature_cache_mb=1e-4)) as server, \
            SplitClient(server.address, wire_dtype="float32", protocol="cached-features") as client:
        with pytest.raises(SplitChannelError, match="NOT_FOUND.*not cached"):
            _step(tiny_edge.edge, client, b1, f1)
        assert server.service.features.stats["evicted"] > 0


def _parts_frame(edge, client, batch, feats):
    """A cached-features train frame as `client` sends it (its images already uploaded)."""
    embeds, parts = edge.embed(batch.input_ids, feats), edge.parts(batch.input_ids, feats)
    tensors, meta, _ = client._inputs(embeds, parts)
    tensors |= {"mask": batch.attention_mask.to(torch.uint8), "labels": batch.labels.to(torch.int32)}
    return Frame("train", tensors, meta)


def test_a_client_cannot_use_another_clients_images(tiny_edge, tiny_llm):
    edge = tiny_edge.edge
    (b1, f1), _ = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm, secret="s3cret") as server:
        alice, bob = (SplitClient(server.address, "float32", token=server.client_token(n), protocol="cached-features") for n in ("a", "b"))
        frame = _parts_frame(edge, alice, b1, f1)
        assert float(alice.request(frame).tensors["loss"]) > 0  # alice's own keys: served
        with pytest.raises(SplitChannelError, match="NOT_FOUND"):
            bob.request(frame)  # the same keys from bob: not his images
        alice.close()
        bob.close()


def _bad_parts(edge, client, batch, feats):
    good = _parts_frame(edge, client, batch, feats)

    def change(tensors=None, meta=None, drop=()):
        t = {k: v for k, v in good.tensors.items() if k not in drop} | (tensors or {})
        return Frame("train", t, good.meta | (meta or {}))

    text, slots = good.tensors["text"], good.tensors["slots"]
    return {
        "text rows": (change({"text": text[:-1]}), "text positions"),
        "slots": (change({"slots": torch.zeros_like(slots)}), "text positions"),
        "keys type": (change(meta={"image_keys": "abc"}), "meta.image_keys must be a list"),
        "one key short": (change(meta={"image_keys": good.meta["image_keys"][:-1]}), "image slots"),
        "adapter shape": (change({"adapter_i_A": good.tensors["adapter_i_A"][:, :-1]}), "expected (r, 32)"),
        "no scale": (change(meta={"scale_adapter_i": None}), "meta.scale_adapter_i must be a finite number"),
        "no text": (change(drop=("text",)), "missing tensor 'text'"),
        "ids out of range": (change({"ids": torch.full_like(batch.input_ids, 10**6, dtype=torch.int32)}, drop=("text",)),
                             "ids must be in"),
    }


@pytest.mark.parametrize("case", ["text rows", "slots", "keys type", "one key short", "adapter shape", "no scale", "no text",
                                  "ids out of range"])
def test_malformed_parts_are_refused_by_name_and_the_stream_keeps_working(tiny_edge, tiny_llm, case):
    edge = tiny_edge.edge
    (b1, f1), _ = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm) as server, SplitClient(server.address, "float32", protocol="cached-features") as client:
        frame, needle = _bad_parts(edge, client, b1, f1)[case]
        with pytest.raises(SplitChannelError, match="INVALID_ARGUMENT") as err:
            client.request(frame)
        assert needle in str(err.value)
        loss, _ = _step(edge, client, b1, f1)
        assert loss > 0


def test_the_protocol_names_agree_and_dropout_is_refused_with_a_cached_protocol():
    from fednano.config import SPLIT_PROTOCOLS, ConfigError, RunConfig, from_dict

    assert tuple(PROTOCOLS) == SPLIT_PROTOCOLS
    with pytest.raises(ConfigError, match="split.protocol.*adapter.dropout = 0"):
        from_dict({"split": {"protocol": "cached-features"}, "adapter": {"dropout": 0.1}})
    with pytest.raises(ConfigError, match="split.protocol: must be one of"):
        from_dict({"split": {"protocol": "features"}})
    assert RunConfig().split.protocol in PROTOCOLS


def _payload(data: bytes) -> int:
    """A frame's tensor bytes: everything after the magic, the header length and the header."""
    return len(data) - 8 - int.from_bytes(data[4:8], "little")


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_the_byte_formulas_are_the_frames_bytes(tiny_edge, tiny_llm, protocol, monkeypatch):
    """Protocol.step_bytes / fisher_step_bytes / image_bytes (what `fednano footprint` reports at any scale)
    equal the payload of the frames a real step sends and receives."""
    import fednano.split.client as split_client
    from fednano.split.frames import encode
    from fednano.split.parts import StepShape

    edge = tiny_edge.edge
    randomize_adapters(edge)
    (batch, feats), _ = _batches(tiny_edge)[0]
    sent: list[tuple[str, int, int]] = []
    decode = split_client.decode

    def recording(data):
        frame = decode(data)
        sent[-1] = (*sent[-1][:2], _payload(encode(frame)))
        return frame

    with SplitServer(tiny_llm) as server, SplitClient(server.address, "float32", protocol=protocol) as client:
        request = client.request_bytes
        monkeypatch.setattr(client, "request_bytes", lambda data, op: (sent.append((op, _payload(data), 0)), request(data, op))[1])
        monkeypatch.setattr(split_client, "decode", recording)
        _step(edge, client, batch, feats)
        empirical_fisher(edge, client, [(batch, feats)])
    B, T = batch.input_ids.shape
    N = edge.num_visual_tokens
    shape = StepShape(B, N, T - N, edge.dim, edge.adapter_i.rank, wire_bytes=4)
    p = PROTOCOLS[protocol]
    steps = [(up, down) for op, up, down in sent if op == "train"]
    assert steps == [p.step_bytes(shape), p.fisher_step_bytes(shape)]
    features = [up for op, up, _ in sent if op == "features"]  # which images do you hold (no tensor), then the new ones
    assert features == ([0, B * p.image_bytes(shape)] if p.caches_features else [])


def test_on_a_bf16_wire_the_cached_protocols_are_no_less_accurate(tiny_edge, tiny_llm):
    """Lossy wires: activations round the whole embeddings and their gradient to bf16; the cached protocols
    round the text rows and the image features (once), and keep the adapters in float32. Against the float32
    wire's gradients, their error is no larger."""
    edge = tiny_edge.edge
    randomize_adapters(edge, scale=0.2)
    (batch, feats), _ = _batches(tiny_edge)[0]
    with SplitServer(tiny_llm) as server:
        with SplitClient(server.address, "float32") as client:
            _, exact = _step(edge, client, batch, feats)
        error = {}
        for protocol in PROTOCOLS:
            with SplitClient(server.address, "bfloat16", protocol=protocol) as client:
                _, got = _step(edge, client, batch, feats)
            error[protocol] = max(float((got[k] - exact[k]).norm() / exact[k].norm()) for k in exact)
    assert 0 < error["activations"] < 0.05
    for protocol in CACHED:
        assert error[protocol] <= error["activations"], error

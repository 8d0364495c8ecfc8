"""The gRPC split channel against a tiny LLM on loopback: round trips, counting, rejections."""

import math

import pytest
import torch

from fednano.config import SplitConfig
from fednano.split.client import SplitChannelError, SplitClient
from fednano.split.frames import Frame, encode
from fednano.split.server import SplitServer


@pytest.fixture()
def server(tiny_llm):
    srv = SplitServer(tiny_llm, SplitConfig(max_frame_mb=1.0)).start()
    yield srv
    srv.stop()


def _request(d: int, B: int = 2, T: int = 6, vocab: int = 10):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    labels = torch.full((B, T), -100)
    labels[:, 3:5] = torch.randint(0, vocab, (B, 2), generator=g)
    return embeds, mask, labels


def test_train_step_round_trip_equals_local_and_counts_bytes(server, tiny_llm):
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    with SplitClient(server.address, wire_dtype="float32") as client:
        loss, grad, n = client.train_step(embeds, mask, labels)
        traffic = client.traffic()
    ref_loss, ref_grad, ref_n = tiny_llm.train_step(embeds, mask, labels)
    assert n == ref_n == 4
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-7)
    # embeds (fp32) + mask (uint8) + labels (int32) go up; grad (fp32) + loss come down
    B, T, d = embeds.shape
    assert traffic["activations_up"] > B * T * d * 4 + B * T * 5
    assert traffic["gradients_down"] > B * T * d * 4
    assert server.service.stats["frames"] == 1 and server.service.stats["errors"] == 0


def test_bf16_wire_halves_activation_bytes(server, tiny_llm):
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    up = {}
    for wire in ("float32", "bfloat16"):
        with SplitClient(server.address, wire_dtype=wire) as client:
            client.train_step(embeds, mask, labels)
            up[wire] = client.traffic()["activations_up"]
    # 2 bytes fewer per element; the header names the longer dtype ("bfloat16" vs "float32")
    assert up["float32"] - up["bfloat16"] == embeds.numel() * 2 - (len("bfloat16") - len("float32"))


def _bad_frames(d: int):
    embeds, mask, labels = _request(d)
    nan = embeds.clone()
    nan[0, 0, 0] = math.nan
    labels_oob = labels.clone()
    labels_oob[0, 3] = 10**6
    return {
        "unknown op": Frame("launch", {}),
        "missing tensor": Frame("train", {"embeds": embeds, "mask": mask}),
        "wrong dtype": Frame("train", {"embeds": embeds.long(), "mask": mask, "labels": labels}),
        "wrong hidden size": Frame("train", {"embeds": embeds[..., :-1], "mask": mask, "labels": labels}),
        "mask shape": Frame("train", {"embeds": embeds, "mask": mask[:, :-1], "labels": labels}),
        "NaN": Frame("train", {"embeds": nan, "mask": mask, "labels": labels}),
        "label out of vocab": Frame("train", {"embeds": embeds, "mask": mask, "labels": labels_oob}),
        "no supervised token": Frame("train", {"embeds": embeds, "mask": mask, "labels": torch.full_like(labels, -100)}),
        "bad reduction": Frame("train", {"embeds": embeds, "mask": mask, "labels": labels}, {"reduction": "max"}),
    }


@pytest.mark.parametrize("case", list(_bad_frames(8)))
def test_malformed_requests_are_refused_and_the_stream_keeps_working(server, tiny_llm, case):
    frame = _bad_frames(tiny_llm.hidden_size)[case]
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    with SplitClient(server.address, wire_dtype="float32") as client:
        with pytest.raises(SplitChannelError) as err:
            client.request(frame)
        assert err.value.status == "INVALID_ARGUMENT"
        # same client, same stream: the next valid step is served
        loss, _, _ = client.train_step(embeds, mask, labels)
    assert math.isfinite(loss.item())
    assert server.service.stats["errors"] == 1


@pytest.mark.parametrize("garbage", [b"\x00" * 10, b"FNS1" + b"\xff" * 20, encode(Frame("train", {"x": torch.zeros(4)}))[:-3]])
def test_garbage_and_truncated_bytes_are_refused(server, garbage):
    with SplitClient(server.address) as client:
        with pytest.raises(SplitChannelError, match="INVALID_ARGUMENT"):
            client.request_bytes(garbage)
        assert client.info()["hidden_size"] > 0


def test_oversized_frame_is_refused_and_server_keeps_serving(server, tiny_llm):
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    huge = torch.zeros(2, 1024, 1024)  # 8 MiB > the 1 MiB limit
    with SplitClient(server.address, max_frame_mb=64) as greedy:
        with pytest.raises(SplitChannelError) as err:
            greedy.request(Frame("train", {"embeds": huge}))
        assert err.value.status == "RESOURCE_EXHAUSTED"
        # the client reopens its stream and goes on
        assert greedy.info()["hidden_size"] == tiny_llm.hidden_size
    with SplitClient(server.address, wire_dtype="float32") as other:
        loss, _, _ = other.train_step(embeds, mask, labels)
    assert math.isfinite(loss.item())


def test_client_disconnecting_mid_request_does_not_hurt_others(server, tiny_llm):
    import grpc

    from fednano.split.server import METHOD

    embeds, mask, labels = _request(tiny_llm.hidden_size)
    frame = encode(Frame("train", {"embeds": embeds, "mask": mask, "labels": labels}))
    channel = grpc.insecure_channel(server.address)
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)(iter([frame, frame]))
    call.cancel()  # gone before its replies
    channel.close()
    with SplitClient(server.address, wire_dtype="float32") as other:
        loss, _, _ = other.train_step(embeds, mask, labels)
    assert math.isfinite(loss.item())


def test_the_server_serves_as_many_concurrent_streams_as_it_admits(tiny_llm):
    """Every admitted stream holds a gRPC thread while open: 24 clients at once (more than any fixed
    pool of 16 threads) all get their steps through."""
    import threading

    n = 24
    srv = SplitServer(tiny_llm, SplitConfig(max_streams=32, max_streams_per_client=32)).start()
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    clients = [SplitClient(srv.address, wire_dtype="float32", timeout=60) for _ in range(n)]
    for c in clients:
        c.train_step(embeds, mask, labels)  # every stream is open from here on
    gate, done, errors = threading.Barrier(n), [], []

    def work(c):
        gate.wait()
        try:
            done.append(c.train_step(embeds, mask, labels)[2])
        except SplitChannelError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    srv.stop()
    assert not errors and len(done) == n


def test_a_stream_per_session_keeps_its_deadline_to_that_session(server, tiny_llm):
    """A stream's deadline is the client's timeout; ending the session between units of work (the
    ClientApp does after every message) gives the next one a fresh stream and deadline."""
    import time

    embeds, mask, labels = _request(tiny_llm.hidden_size)
    with SplitClient(server.address, wire_dtype="float32", timeout=1.5) as client:
        client.train_step(embeds, mask, labels)
        time.sleep(2.0)
        with pytest.raises(SplitChannelError, match="DEADLINE_EXCEEDED"):  # the same stream, past its deadline
            client.train_step(embeds, mask, labels)
        client.train_step(embeds, mask, labels)  # reopened after the failure
        client.end_session()
        time.sleep(2.0)
        client.end_session()
        assert client.train_step(embeds, mask, labels)[2] == 4  # a fresh stream each session


@pytest.mark.parametrize("wire", ["float8_e4m3", "float8_e5m2", "int8"])
def test_one_byte_wires_carry_activations_and_gradients_at_a_quarter_of_fp32(server, tiny_llm, wire):
    """split.wire_dtype float8_* / int8: embeddings up and gradients down as one-byte codes with one scale
    each; the step's loss and gradient stay close to the exact ones, at a quarter of fp32's bytes."""
    embeds, mask, labels = _request(tiny_llm.hidden_size)
    ref_loss, ref_grad, _ = tiny_llm.train_step(embeds, mask, labels)
    traffic = {}
    for w in ("float32", wire):
        with SplitClient(server.address, wire_dtype=w) as client:
            loss, grad, _ = client.train_step(embeds, mask, labels)
            traffic[w] = client.traffic()
    assert grad.dtype == embeds.dtype
    assert loss.item() == pytest.approx(ref_loss.item(), rel=0.05)
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
    assert cos > 0.98, cos
    n = embeds.numel()
    for key in ("activations_up", "gradients_down"):  # 3 bytes fewer per value (give or take the header)
        assert abs(traffic["float32"][key] - traffic[wire][key] - 3 * n) < 100, key

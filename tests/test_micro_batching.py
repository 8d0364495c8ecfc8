"""Cross-client micro-batching: steps that arrive together share one LLM pass, results stay per client."""

import dataclasses
import threading

import pytest
import torch

from fednano.config import SplitConfig
from fednano.split.client import SplitClient
from fednano.split.server import SplitServer


def _request(seed, B, T, d, reduction):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -1] = 0
    labels = torch.full((B, T), -100)
    labels[:, T - 3 : T - 1] = torch.randint(0, 10, (B, 2), generator=g)
    return emb, mask, labels, reduction


def test_batched_steps_equal_separate_steps(tiny_llm_on, device):
    d = tiny_llm_on.hidden_size
    reqs = [_request(1, 2, 7, d, "mean"), _request(2, 3, 11, d, "sum"), _request(3, 1, 5, d, "mean")]
    together = tiny_llm_on.train_steps(reqs)
    for req, (loss, grad, n) in zip(reqs, together, strict=True):
        assert grad.device.type == device.type  # results stay on the LLM's device until the wire
        ref_loss, ref_grad, ref_n = tiny_llm_on.train_step(*req)
        assert n == ref_n and grad.shape == req[0].shape
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


def test_eager_attention_gives_the_fused_kernels_loss_and_gradients(tiny_llm_on):
    """model.attention: the plain kernel computes the same step as the fused one (fp32, padded batch)."""
    req = _request(4, 3, 9, tiny_llm_on.hidden_size, "mean")
    fused = tiny_llm_on.train_step(*req)
    tiny_llm_on.set_attention("eager")
    try:
        assert tiny_llm_on.model.config._attn_implementation == "eager"
        plain = tiny_llm_on.train_step(*req)
    finally:
        tiny_llm_on.set_attention("sdpa")
    assert plain[0].item() == pytest.approx(fused[0].item(), rel=1e-5)
    torch.testing.assert_close(plain[1], fused[1], atol=1e-6, rtol=1e-4)


def test_compiled_training_steps_equal_eager_ones(tiny_llm_on):
    """model.compile: micro-batched steps of several lengths and both reductions, and the label-private split's
    hidden states and backward, give the eager decoder's losses and gradients (fp32) through torch.compile."""
    d = tiny_llm_on.hidden_size
    reqs = [_request(5, 2, 7, d, "mean"), _request(6, 3, 11, d, "sum")]
    eager = tiny_llm_on.train_steps(reqs) + tiny_llm_on.train_steps(reqs[1:])
    pos = reqs[0][2] != -100
    h_eager = tiny_llm_on.hidden_states(reqs[0][0], reqs[0][1], pos)
    g_eager = tiny_llm_on.hidden_backward(reqs[0][0], reqs[0][1], pos, torch.ones_like(h_eager))
    tiny_llm_on.compile_training()
    assert tiny_llm_on.train_decoder is not tiny_llm_on.decoder
    compiled = tiny_llm_on.train_steps(reqs) + tiny_llm_on.train_steps(reqs[1:])  # a new batch size: dynamic shapes
    for (loss, grad, n), (ref_loss, ref_grad, ref_n) in zip(compiled, eager, strict=True):
        assert n == ref_n
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    h = tiny_llm_on.hidden_states(reqs[0][0], reqs[0][1], pos)
    torch.testing.assert_close(h, h_eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tiny_llm_on.hidden_backward(reqs[0][0], reqs[0][1], pos, torch.ones_like(h)), g_eager, atol=1e-5, rtol=1e-4)


def test_model_compile_compiles_the_server_llms_training_steps(tiny_cfg):
    """model.compile = true reaches the server: its LLM trains through the compiled decoder; false leaves it eager."""
    from fednano.runtime.server import ServerSide

    for flag in (True, False):
        side = ServerSide(dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, compile=flag)))
        try:
            assert (side.llm.train_decoder is not side.llm.decoder) is flag
        finally:
            side.stop()


def test_concurrent_clients_are_batched_by_the_server(tiny_llm):
    d = tiny_llm.hidden_size
    n_clients, steps = 4, 6
    results: dict[int, list] = {}
    with SplitServer(tiny_llm, SplitConfig(micro_batching=True)) as server:
        gate = threading.Barrier(n_clients)

        def client(i):
            with SplitClient(server.address, wire_dtype="float32") as c:
                out = []
                for s in range(steps):
                    gate.wait()  # all clients send at once
                    out.append(c.train_step(*_request(100 * i + s, 2, 6 + i, d, "mean")))
                results[i] = out

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = dict(server.service.worker.steps)
    assert stats["train_requests"] == n_clients * steps
    assert stats["llm_passes"] < stats["train_requests"]  # some steps shared a pass
    for i in range(n_clients):
        for s in range(steps):
            loss, grad, _ = results[i][s]
            ref_loss, ref_grad, _ = tiny_llm.train_step(*_request(100 * i + s, 2, 6 + i, d, "mean"))
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
            torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)

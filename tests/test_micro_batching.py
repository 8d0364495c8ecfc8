"""Cross-client micro-batching: steps that arrive together share one LLM pass, results stay per client."""

import threading

import pytest
import torch

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


def test_concurrent_clients_are_batched_by_the_server(tiny_llm):
    d = tiny_llm.hidden_size
    n_clients, steps = 4, 6
    results: dict[int, list] = {}
    with SplitServer(tiny_llm) as server:
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

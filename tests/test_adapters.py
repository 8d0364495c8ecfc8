import torch

from fednano.client.adapters import ADAPTER_PARAM_NAMES, NanoAdapter, adapter_param_count


def test_fresh_adapter_is_identity():
    # Prepare
    ad = NanoAdapter(dim=32, rank=4, alpha=8.0)
    x = torch.randn(2, 5, 32)
    # Execute
    y = ad(x)
    # Assert
    assert torch.equal(y, x)
    assert torch.count_nonzero(ad.B.weight) == 0
    assert torch.count_nonzero(ad.A.weight) > 0


def test_adapter_formula_matches_hand_computation():
    ad = NanoAdapter(dim=2, rank=1, alpha=2.0)  # scale = alpha / r = 2
    with torch.no_grad():
        ad.A.weight.copy_(torch.tensor([[1.0, 2.0]]))  # A: (r=1, d=2)
        ad.B.weight.copy_(torch.tensor([[0.5], [-1.0]]))  # B: (d=2, r=1)
    x = torch.tensor([[1.0, 1.0]])
    # A x = 3; B(3) = (1.5, -3); y = x + 2 * (1.5, -3) = (4, -5)
    assert torch.allclose(ad(x), torch.tensor([[4.0, -5.0]]))


def test_parameter_counts():
    ad = NanoAdapter(dim=576, rank=16, alpha=32)
    assert sum(p.numel() for p in ad.parameters()) == 2 * 576 * 16
    assert adapter_param_count(576, 16) == 2 * sum(p.numel() for p in ad.parameters())
    # The paper's figure: two rank-64 adapters on a d=4096 LLM (LLaVA-1.5-7B).
    assert adapter_param_count(4096, 64) == 1_048_576
    big = NanoAdapter(dim=4096, rank=64, alpha=128)
    assert big(torch.randn(1, 3, 4096)).shape == (1, 3, 4096)


def test_nanoedge_exposes_exactly_the_adapter_tensors(tiny_edge):
    edge = tiny_edge.edge
    trainable = {n for n, p in edge.named_parameters() if p.requires_grad}
    assert trainable == set(ADAPTER_PARAM_NAMES)
    d, r = edge.dim, edge.adapter_i.rank
    assert sum(p.numel() for p in edge.adapter_parameters().values()) == adapter_param_count(d, r)

"""What a merge did, in numbers (federation.merge_diagnostics): pure functions on the round's client states.

Why Fisher merging can lose to plain averaging on LoRA-shaped adapters, each with a number here:

    weight concentration   per entry, client k's share w_k / sum_j w_j of the merge weight: the share of entries one
                           client dominates (>= 90 %), and the effective number of clients 1 / sum_k share_k^2
    client weight shares   each client's mean share over all entries, beside its Fisher's total: an empirical Fisher
                           taken after local training shrinks for the clients that fit their data best (Kunstner et al.,
                           "Limitations of the empirical Fisher approximation", NeurIPS 2019)
    factor mismatch        ||B̄ Ā - sum_k p_k B_k A_k|| / ||sum_k p_k B_k A_k||, p_k = n_k / N: merging A and B apart
                           makes cross terms no client produced (FedEx-LoRA, LoRA-FAIR)
    update cosines         each client's update against the merged one, and the merged update's size against FedAvg's
    Fisher noise           (client side, client/fisher.py) the relative error of the Fisher from train.fisher_samples
                           against one from 4x as many

The weights are the ones the run's Fisher merge uses (aggregation.merge_weights, with its floor, normalisation and power);
for a method that does not merge by Fisher (fedavg), the same weights are computed from the Fisher its clients send for
the diagnostics only: what Fisher merging would have done with the same updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fednano.aggregation import fedavg

Tensors = dict[str, torch.Tensor]
DOMINANT = 0.9  # a client "holds" an entry when its share of the weight is at least this


def weight_concentration(weights: Sequence[Tensors]) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Per tensor: the share of entries one client holds >= 90 % of the weight of ('dominated'), and the mean effective
    number of clients per entry 1 / sum_k s_k^2 ('effective_clients'); per client, its mean share over all entries."""
    per_tensor: dict[str, dict[str, float]] = {}
    share_sum, entries = [0.0] * len(weights), 0
    for k in weights[0]:
        w = torch.stack([wk[k].double() for wk in weights])  # (K, *shape)
        s = w / w.sum(0, keepdim=True)
        per_tensor[k] = {"dominated": float((s.max(0).values >= DOMINANT).double().mean()),
                         "effective_clients": float((1.0 / s.pow(2).sum(0)).mean())}
        for i in range(len(weights)):
            share_sum[i] += float(s[i].sum())
        entries += s[0].numel()
    return per_tensor, [v / entries for v in share_sum]


def factor_mismatch(merged: Tensors, thetas: Sequence[Tensors], n_examples: Sequence[float], reference: Tensors) -> dict[str, float]:
    """Per adapter (a pair 'X.A.weight', 'X.B.weight'): ||B̄ Ā - sum_k p_k B_k A_k|| / ||sum_k p_k B_k A_k|| (Frobenius),
    p_k = n_k / sum n. A factor a client did not send (FedNano-FFA's frozen A) is the reference's; 0 where the average
    product is 0 (B = 0 at the start)."""
    total = float(sum(n_examples))
    out = {}
    for a in (k for k in reference if k.endswith(".A.weight")):
        b = a[: -len("A.weight")] + "B.weight"

        def factor(state: Tensors, key: str) -> torch.Tensor:
            return state.get(key, reference[key]).double()

        mean_product = sum(float(n) / total * (factor(t, b) @ factor(t, a)) for t, n in zip(thetas, n_examples, strict=True))
        assert isinstance(mean_product, torch.Tensor)
        norm = float(mean_product.norm())
        out[a[: -len(".A.weight")]] = float((factor(merged, b) @ factor(merged, a) - mean_product).norm()) / norm if norm > 0 else 0.0
    return out


def _flat_update(state: Tensors, reference: Tensors) -> torch.Tensor:
    return torch.cat([(state[k].double() - reference[k].double()).flatten() for k in sorted(state)])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """cos(x, y); 0 when either is 0."""
    nx, ny = float(x.norm()), float(y.norm())
    return float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 0.0


def merge_diagnostics(reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors], weights: Sequence[Tensors],
                      n_examples: Sequence[float], merged: Tensors) -> dict:
    """One round's merge in numbers. reference: the round's starting global state (the part the clients upload);
    thetas, fishers, weights (aggregation.merge_weights), n_examples: per accepted client; merged: what the server made
    of them (the uploaded part). Per-client lists are in the clients' order."""
    if not thetas or not (len(thetas) == len(fishers) == len(weights) == len(n_examples)):
        raise ValueError("merge_diagnostics needs one state, Fisher, weight and example count per client")
    shared = {k: reference[k] for k in thetas[0]}
    per_tensor, shares = weight_concentration(weights)
    merged_update = _flat_update({k: merged[k] for k in shared}, shared)
    average_update = _flat_update(fedavg(thetas, n_examples), shared)
    updates = [_flat_update(t, shared) for t in thetas]
    return {
        "clients": [{"fisher_total": float(sum(float(v.double().sum()) for v in f.values())), "weight_share": s,
                     "update_norm": float(u.norm()), "cosine_to_merged": cosine(u, merged_update)}
                    for f, s, u in zip(fishers, shares, updates, strict=True)],
        "tensors": per_tensor,
        "factor_mismatch": factor_mismatch({**reference, **merged}, thetas, n_examples, reference),
        "merged_update_norm": float(merged_update.norm()),
        "average_update_norm": float(average_update.norm()),
        # how far the merge lands from FedAvg's result on the same updates, relative to FedAvg's step
        "distance_to_average": float((merged_update - average_update).norm()) / max(float(average_update.norm()), 1e-300),
    }


def relative_error(estimate: Tensors, reference: Tensors) -> float:
    """||estimate - reference|| / ||reference|| over all tensors together (L2); nan if the reference is 0."""
    num = sum(float((estimate[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    den = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    return math.sqrt(num / den) if den > 0 else float("nan")

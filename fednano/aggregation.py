"""Server-side merging of client adapters: pure functions on name -> tensor dicts.

    fedavg:       theta = sum_k n_k theta_k / sum_k n_k
    fisher_merge: theta = sum_k n_k F_k theta_k / sum_k n_k F_k     (element-wise; F^p with a tempering power p)
    fisher_prior_merge: theta = theta_g + sum_k w_k Δ_k / (sum_k w_k + λ N F_prior)  (a running server Fisher as prior)
    product_merge + low_rank_factors (fednano-product): the adapters' products P_k = B_k A_k merged
                  with Kronecker-factored importance w_k = n_k (r_k c_k^T), then re-factorised to rank r

    dp_fedavg:    client-level DP (DP-FedAvg, McMahan et al. 2018): theta = theta_g + (sum_k clip_C(theta_k - theta_g)
                  + N(0, (sigma C)^2 I)) / m, every client weighing the same and m the expected clients per round

FedAvg on the same NanoAdapters is exactly "FedNano without Fisher".
`validate_update` is the gate every client reply passes before it is merged. Which of these a
method uses is the method registry's business (fednano/methods/).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def fedavg(thetas: Sequence[Tensors], n_examples: Sequence[float]) -> Tensors:
    if not thetas or len(thetas) != len(n_examples):
        raise ValueError("fedavg needs one example count per client and at least one client")
    total = float(sum(n_examples))
    if total <= 0:
        raise ValueError("total number of examples must be positive")
    out = {}
    for k in thetas[0]:
        acc = torch.zeros_like(thetas[0][k], dtype=torch.float64)
        for t, n in zip(thetas, n_examples, strict=True):
            acc += float(n) * t[k].double()
        out[k] = acc.div(total).to(thetas[0][k].dtype)
    return out


def clip_to_norm(update: Tensors, bound: float) -> tuple[Tensors, float]:
    """(the update scaled to L2 norm at most `bound` over all its tensors together, its norm before)."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def dp_fedavg(reference: Tensors, thetas: Sequence[Tensors], clip: float, noise_multiplier: float, expected_clients: float,
              generator: torch.Generator | None) -> Tensors:
    """Client-level DP FedAvg: each client's update clipped to L2 norm `clip`, their sum plus Gaussian noise of std
    noise_multiplier * clip per entry, divided by the expected number of clients per round (a fixed denominator, so
    that one client's presence moves the result by at most clip / expected_clients). With no client (none sampled or
    none replied) the release is the noise alone. Noise is drawn on each tensor's device from `generator` (one per
    device: None draws from torch's default one)."""
    if expected_clients <= 0:
        raise ValueError("dp_fedavg needs expected_clients > 0")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
    for t in thetas:
        clipped, _ = clip_to_norm({k: t[k].double() - reference[k].double() for k in reference}, clip)
        for k in total:
            total[k] += clipped[k]
    out = {}
    for k, v in reference.items():
        noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=torch.float64) * (noise_multiplier * clip)
        out[k] = (v.double() + (total[k] + noise) / expected_clients).to(v.dtype)
    return out


def group_importance(fisher: Tensors, by_rank: bool) -> Tensors:
    """A client's Fisher summed within groups: per tensor (a scalar each), or, `by_rank`, per rank component (A (r, d):
    each row's sum; B (d, r): each column's) -> {k: () or (r,)}. Few numbers, so that they can be noised (dp_fisher_merge)."""
    if not by_rank:
        return {k: f.double().sum() for k, f in fisher.items()}
    return {k: f.double().sum(0 if k.endswith("B.weight") else 1) for k, f in fisher.items()}


def _spread(weight: torch.Tensor, key: str, like: torch.Tensor) -> torch.Tensor:
    """A group weight (() or (r,)) laid over its tensor's entries (A: along rows; B: along columns)."""
    if weight.dim() == 0:
        return weight.expand_as(like)
    return (weight.unsqueeze(0) if key.endswith("B.weight") else weight.unsqueeze(1)).expand_as(like)


def dp_fisher_merge(reference: Tensors, thetas: Sequence[Tensors], fishers: Sequence[Tensors], clip: float, noise_multiplier: float,
                    expected_clients: float, generator: torch.Generator | None, by_rank: bool = False) -> Tensors:
    """Client-level DP Fisher merging of updates, theta = ref + (sum_k w_k Δ_k + noise) / (sum_k w_k + noise), with
    group weights (group_importance) instead of per-entry ones. Client k's weights w_k (g groups) are scaled to
    L2 norm sqrt(g) (mean about 1), its weighted update w_k Δ_k clipped to L2 norm `clip`; Gaussian noise of std
    noise_multiplier × clip goes on the numerator's sum, noise_multiplier × sqrt(g) on the weights' sum. Each client then
    moves (numerator / clip, weights / sqrt(g)) by at most sqrt(2): one Gaussian mechanism of noise multiplier
    noise_multiplier / sqrt(2) a round. The weights' noisy sum is floored at expected_clients / 2 (a data-independent
    bound on how much a draw of noise can amplify the update). With no client the release is the noise alone."""
    if len(thetas) != len(fishers) or expected_clients <= 0:
        raise ValueError("dp_fisher_merge needs one Fisher per client and expected_clients > 0")
    num = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
    den = {k: torch.zeros_like(w) for k, w in group_importance(num, by_rank).items()}  # the groups' shapes
    groups = sum(w.numel() for w in den.values())
    sd_num, sd_den = noise_multiplier * clip, noise_multiplier * math.sqrt(groups)
    for t, f in zip(thetas, fishers, strict=True):
        imp = group_importance({k: f[k] for k in reference}, by_rank)
        norm = math.sqrt(sum(float(w.pow(2).sum()) for w in imp.values()))
        w = {k: v * (math.sqrt(groups) / norm) if norm > 0 else torch.ones_like(v) for k, v in imp.items()}
        weighted, _ = clip_to_norm({k: _spread(w[k], k, num[k]) * (t[k].double() - reference[k].double()) for k in reference}, clip)
        for k in reference:
            num[k] += weighted[k]
            den[k] += w[k]
    out = {}
    for k, v in reference.items():
        noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=torch.float64) * sd_num
        d_noise = torch.randn(den[k].shape, generator=generator, device=v.device, dtype=torch.float64) * sd_den
        total = (den[k].to(v.device) + d_noise).clamp(min=expected_clients / 2)
        out[k] = (v.double() + (num[k] + noise) / _spread(total, k, num[k])).to(v.dtype)
    return out


def normalize_fisher(fisher: Tensors) -> Tensors:
    """Scale a client's Fisher to mean 1 over all its entries (so no client dominates by scale)."""
    total = sum(float(v.double().sum()) for v in fisher.values())
    count = sum(v.numel() for v in fisher.values())
    mean = total / count if count else 0.0
    return {k: v / mean for k, v in fisher.items()} if mean > 0 else dict(fisher)


def merge_weights(fishers: Sequence[Tensors], n_examples: Sequence[float], floor: float = 1e-6, normalize: bool = False,
                  power: float = 1.0) -> list[Tensors]:
    """Each client's unnormalised per-entry merge weight w_k = n_k * max(F_k, floor)^power (float64), F_k first scaled to
    mean 1 with `normalize`. power = 1 is Fisher merging, 0 is FedAvg's n_k; in between, a tempered Fisher."""
    if not fishers or len(fishers) != len(n_examples):
        raise ValueError("merge_weights needs one Fisher and one example count per client")
    if normalize:
        fishers = [normalize_fisher(f) for f in fishers]
    return [{k: float(n) * v.double().clamp(min=floor).pow(power) for k, v in f.items()} for f, n in zip(fishers, n_examples, strict=True)]


def fisher_merge(
    thetas: Sequence[Tensors], fishers: Sequence[Tensors], n_examples: Sequence[float], floor: float = 1e-6, normalize: bool = False,
    power: float = 1.0,
) -> Tensors:
    """Element-wise Fisher-weighted average sum_k w_k theta_k / sum_k w_k, w_k from merge_weights (F floored so the merge is
    always defined)."""
    if not thetas or not (len(thetas) == len(fishers) == len(n_examples)):
        raise ValueError("fisher_merge needs one Fisher and one example count per client")
    weights = merge_weights(fishers, n_examples, floor, normalize, power)
    out = {}
    for k in thetas[0]:
        num = torch.zeros_like(thetas[0][k], dtype=torch.float64)
        den = torch.zeros_like(num)
        for t, w in zip(thetas, weights, strict=True):
            num += w[k] * t[k].double()
            den += w[k]
        out[k] = (num / den).to(thetas[0][k].dtype)
    return out


def fisher_prior_merge(reference: Tensors, thetas: Sequence[Tensors], weights: Sequence[Tensors], n_total: float,
                       prior: Tensors | None, prior_weight: float) -> Tensors:
    """Fisher merging of the updates Δ_k = theta_k - reference with the server's running Fisher as a prior on the update
    (after Daheim et al., "Model merging by uncertainty-based gradient matching", ICLR 2024):

        theta = reference + sum_k w_k Δ_k / (sum_k w_k + prior_weight * n_total * prior)

    w_k the clients' merge weights (merge_weights), n_total = sum_k n_k, `prior` the mean per-example weight of the earlier
    rounds (what the global state is already known to fit). With no prior (None, or prior_weight = 0) this is exactly
    fisher_merge. An entry that earlier rounds found important and this round's clients do not moves less."""
    if not thetas or len(thetas) != len(weights):
        raise ValueError("fisher_prior_merge needs one weight per client")
    out = {}
    for k, ref in reference.items():
        num = torch.zeros_like(ref, dtype=torch.float64)
        den = torch.zeros_like(num)
        for t, w in zip(thetas, weights, strict=True):
            num += w[k] * (t[k].double() - ref.double())
            den += w[k]
        if prior is not None and prior_weight > 0:
            den = den + prior_weight * n_total * prior[k].double()
        out[k] = (ref.double() + num / den).to(ref.dtype)
    return out


def product_merge(products: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor],
                  n_examples: Sequence[float], floor: float = 1e-6) -> torch.Tensor:
    """P = sum_k w_k * P_k / sum_k w_k (element-wise), w_k = n_k * max(r_k c_k^T, floor): each client's product
    (d_out, d_in) weighted by a per-row (d_out,) times per-column (d_in,) importance, in float64."""
    if not products or not (len(products) == len(rows) == len(cols) == len(n_examples)):
        raise ValueError("product_merge needs one row and one column importance and one example count per client")
    num = torch.zeros_like(products[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for p, r, c, n in zip(products, rows, cols, n_examples, strict=True):
        w = float(n) * torch.outer(r.double(), c.double()).clamp(min=floor)
        num += w * p.double()
        den += w
    return num / den


def low_rank_factors(product: torch.Tensor, rank: int, fallback_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of `product` (truncated SVD, sqrt of the singular
    values on each side). A direction with no singular value left keeps `fallback_a`'s row in A and 0 in B:
    B A is unchanged, and the direction can still learn (A = 0 there would freeze it for good)."""
    u, sv, vh = torch.linalg.svd(product.double(), full_matrices=False)
    u, sv, vh = u[:, :rank], sv[:rank], vh[:rank]
    root = sv.sqrt()
    a, b = root[:, None] * vh, u * root
    dead = sv <= sv.max().clamp(min=torch.finfo(torch.float64).tiny) * 1e-10
    a[dead], b[:, dead] = fallback_a.double()[dead], 0.0
    return a, b


def update_norm(reference: Tensors, theta: Tensors) -> float:
    """L2 norm of theta - reference over all tensors."""
    return math.sqrt(sum(float((theta[k].double() - reference[k].double()).pow(2).sum()) for k in reference))


def validate_update(reference: Tensors, theta: Tensors, fisher: Tensors | None, n_examples: float, max_norm: float = 0.0) -> list[str]:
    """Reasons to reject a client's reply (empty list = accept); max_norm > 0 bounds ||theta - reference||."""
    problems = []
    if not (isinstance(n_examples, (int, float)) and math.isfinite(n_examples) and n_examples > 0):
        problems.append(f"num-examples must be a positive number, got {n_examples!r}")
    for what, tensors in (("adapters", theta), ("fisher", fisher)):
        if tensors is None:
            continue
        if set(tensors) != set(reference):
            problems.append(f"{what}: keys {sorted(tensors)} != expected {sorted(reference)}")
            continue
        for k, ref in reference.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(ref.shape):
                problems.append(f"{what}.{k}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}")
            elif not torch.isfinite(t).all():
                problems.append(f"{what}.{k}: contains NaN or Inf")
            elif what == "fisher" and (t < 0).any():
                problems.append(f"{what}.{k}: negative entries")
    if max_norm > 0 and not problems:
        norm = update_norm(reference, theta)
        if norm > max_norm:
            problems.append(f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm:g}")
    return problems


# --------------------------------------------------------------- server optimisers
def server_opt_step(
    kind: str, current: Tensors, aggregated: Tensors, state: Tensors, *, lr: float, beta1: float, beta2: float, tau: float,
) -> tuple[Tensors, Tensors]:
    """One FedOpt server step (Reddi et al. 2021) on the pseudo-gradient delta = aggregated - current.

        m = b1 m + (1 - b1) delta
        adam: v = b2 v + (1 - b2) delta^2          yogi: v = v - (1 - b2) delta^2 sign(v - delta^2)
        theta = current + eta_t m / (sqrt(v) + tau)

    adam uses the bias-corrected eta_t = eta sqrt(1 - b2^t) / (1 - b1^t), yogi eta_t = eta,
    with t the number of server steps taken (state "step"). Same maths as Flower's
    FedAdam / FedYogi, whose t is server_round + 1 (tests check the equality).
    state: {"step": (1,), "m.<name>": ..., "v.<name>": ...} (empty = fresh). Returns (theta, new state).
    """
    if kind not in ("adam", "yogi"):
        raise ValueError(f"unknown server optimiser {kind!r}")
    t = int(state["step"].item()) + 1 if "step" in state else 1
    new_state: Tensors = {"step": torch.tensor([t], dtype=torch.int64)}
    eta = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) if kind == "adam" else lr
    out = {}
    for k, x in current.items():
        delta = aggregated[k].double() - x.double()
        m = beta1 * state.get(f"m.{k}", torch.zeros_like(delta)).double() + (1 - beta1) * delta
        v = state.get(f"v.{k}", torch.zeros_like(delta)).double()
        d2 = delta**2
        v = beta2 * v + (1 - beta2) * d2 if kind == "adam" else v - (1 - beta2) * d2 * torch.sign(v - d2)
        new_state[f"m.{k}"], new_state[f"v.{k}"] = m.float(), v.float()
        out[k] = (x.double() + eta * m / (v.sqrt() + tau)).to(x.dtype)
    return out, new_state


def proximal_term(params: Mapping[str, torch.Tensor], anchor: Tensors, mu: float) -> torch.Tensor:
    """FedProx's mu/2 * sum_k ||p_k - anchor_k||^2 (its gradient is mu * (p - anchor))."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for k, p in params.items():
        total = total + ((p - anchor[k].to(p.device, p.dtype)) ** 2).sum()
    return 0.5 * mu * total

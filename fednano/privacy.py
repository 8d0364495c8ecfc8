"""Noise on what the client sends: metric local differential privacy for text embeddings.

A client adds to each text embedding it sends a vector z with density ∝ exp(−ε‖z‖₂) (the
multivariate Laplace mechanism of metric DP for word embeddings, Feyisetan et al., WSDM 2020):
its direction is uniform on the sphere and its norm follows Gamma(d, 1/ε), so E‖z‖ = d/ε. For two
embeddings x, x′ and any set S of outputs, P(x + z ∈ S) ≤ exp(ε‖x − x′‖) · P(x′ + z ∈ S): the
guarantee between two tokens grows with their distance. `privacy.embedding_noise` sets E‖z‖ as a
multiple of the median norm of the embedding table's rows; the run reports ε per unit of distance
and per typical token pair (ε times the median distance between two distinct rows).

The pure maths here is tested against hand-computed values; `TextNoise` is what a client's NanoEdge
applies to its text positions (training, Fisher and evaluation frames alike).

Every draw that protects privacy here and elsewhere (this noise, DP-SGD's and DP-FedAvg's, the label-private
split's gradient noise, randomized response, client sampling under client DP) comes from OS entropy
(`noise_seed`, `secret_rng`): a seed derived from the config, the round or the model would let any party that
knows those recompute the noise and subtract it. Only `privacy.reproducible_noise` (tests) seeds it, and such a
run is marked not private.

Also here: the DP accounts (Opacus's RDP accountant: DP-FedAvg's ε per round, DP-SGD's per-client ledger, the noise
for a target ε) and randomized response on the answers a client trains with (`privacy.label_epsilon`, label DP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from fednano.config import ConfigError, PrivacyConfig
from fednano.data.samples import DataError, Sample


def noise_seed(reproducible: bool, *parts: object) -> int:
    """A seed for privacy noise: 63 bits of OS entropy, which the side that draws keeps to itself (never sent, logged or
    checkpointed); with `reproducible` (privacy.reproducible_noise: tests only, the run is not private), a hash of
    `parts`, which anyone who knows them can recompute."""
    if not reproducible:
        return secrets.randbits(63)
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def secret_rng(reproducible: bool, *parts: object) -> random.Random:
    """A random.Random for privacy choices (randomized response, client sampling under client DP): OS entropy
    (random.SystemRandom), or with `reproducible` one seeded by `parts` (noise_seed)."""
    return random.Random(noise_seed(True, *parts)) if reproducible else random.SystemRandom()


def not_private(p: PrivacyConfig) -> dict[str, object]:
    """What results.json `privacy` says of a run whose privacy noise anyone can recompute ({} if none is)."""
    if not p.reproducible_noise:
        return {}
    return {"private": False, "not_private_because": "privacy.reproducible_noise = true: every privacy noise draw, randomized answer "
            "and client sample is seeded by the config, so whoever knows it can recompute and subtract the noise (for tests only)"}


def metric_dp_noise(n: int, d: int, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """n draws (n, d) of z with density ∝ exp(−ε‖z‖), on the generator's device: a uniform direction times
    a Gamma(d, 1/ε) norm (for integer d, the sum of d standard exponentials, divided by ε)."""
    dev = generator.device
    direction = torch.randn(n, d, generator=generator, device=dev)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = -torch.log1p(-torch.rand(n, d, generator=generator, device=dev)).sum(1) / epsilon  # Exp(1) = −log(1 − U)
    return direction * radius.unsqueeze(1)


def metric_epsilon(noise: float, table: torch.Tensor) -> float:
    """ε per unit of L2 distance for E‖z‖ = noise × the median row norm of `table` (V, d): ε = d / E‖z‖."""
    return table.shape[1] / (noise * float(table.float().norm(dim=1).median()))


def typical_distance(table: torch.Tensor, pairs: int = 4096, seed: int = 0) -> float:
    """The median L2 distance between two distinct rows of `table`, over `pairs` seeded random pairs."""
    dev = table.device
    g = torch.Generator(device=dev).manual_seed(seed)
    v = table.shape[0]
    i = torch.randint(0, v, (pairs,), generator=g, device=dev)
    j = (i + torch.randint(1, v, (pairs,), generator=g, device=dev)) % v  # never i itself
    return float((table[i].float() - table[j].float()).norm(dim=1).median())


def embedding_privacy(noise: float, table: torch.Tensor) -> dict[str, float]:
    """What results.json reports for privacy.embedding_noise: ε per unit distance, ε between a typical pair of
    tokens, and the expected noise norm."""
    eps = metric_epsilon(noise, table)
    return {"embedding_noise": noise, "epsilon_per_unit_distance": eps, "epsilon_typical_token_pair": eps * typical_distance(table),
            "expected_noise_norm": table.shape[1] / eps}


class TextNoise:
    """Adds metric-DP noise to every text position of the embeddings a client sends (image slots are left alone:
    the caller scatters the visual tokens over them afterwards). Its seed is the client's secret: OS entropy unless
    given (ClientJob reseeds it per message with noise_seed, a fixed one only under privacy.reproducible_noise);
    the generator lives on the device of the embeddings it noises."""

    def __init__(self, epsilon: float, seed: int | None = None) -> None:
        self.epsilon = epsilon
        self.reseed(noise_seed(False) if seed is None else seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T, d) text embeddings -> the same plus fresh noise per position (no gradient flows into the noise)."""
        if text.device not in self._generators:
            self._generators[text.device] = torch.Generator(device=text.device).manual_seed(self.seed)
        b, t, d = text.shape
        z = metric_dp_noise(b * t, d, self.epsilon, self._generators[text.device])
        return text + z.reshape(b, t, d).to(text.dtype)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The ε, at δ, of `steps` Poisson-subsampled Gaussian steps at (noise_multiplier, sample_rate): Opacus's RDP
    accountant. Infinite without noise; 0 before any step."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]  # what `steps` calls of acc.step(...) leave
    with quiet_orders():
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def quiet_orders() -> Iterator[None]:
    """Silences Opacus's "Optimal order is the largest alpha" (its ε is then still a valid upper bound, only looser)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def client_dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The ε of `rounds` rounds of DP-FedAvg at (noise_multiplier, sample_rate), at δ: one accountant step a round
    (Poisson sampling of clients, as Federated.sample samples under client DP: every node independently with
    probability sample_rate, from OS entropy). Infinite without noise."""
    return math.inf if noise_multiplier == 0 else rdp_epsilon(noise_multiplier, sample_rate, rounds, delta)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose `steps` steps at `sample_rate` spend `target_epsilon` at `delta` (Opacus's search over
    its RDP accountant, to 0.01 in ε)."""
    from opacus.accountants.utils import get_noise_multiplier

    with quiet_orders():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                          accountant="rdp"))


def dp_sgd_ledger(previous: list[dict[str, dict]], replies: dict[str, tuple[float, float, int]], delta: float) -> dict[str, dict]:
    """privacy.dp_sgd's accounts after a round: for each client that trained in it (replies: partition -> (noise
    multiplier, sample rate, steps this round)), its steps so far (its latest entry in `previous`, the earlier rounds'
    ledgers, plus this round's) and the ε its data has spent at δ."""
    out = {}
    for pid, (sigma, rate, steps) in replies.items():
        before = next((led[pid]["steps"] for led in reversed(previous) if pid in led), 0)
        total = int(before) + int(steps)
        out[pid] = {"steps": total, "noise_multiplier": sigma, "sample_rate": rate, "epsilon": rdp_epsilon(sigma, rate, total, delta)}
    return out


def worst_epsilon(ledgers: list[dict[str, dict]]) -> float:
    """The largest ε any client's data has spent, over every client's latest entry in `ledgers` (0 if none)."""
    latest: dict[str, float] = {}
    for led in ledgers:
        latest.update({pid: e["epsilon"] for pid, e in led.items()})
    return max(latest.values(), default=0.0)


def keep_probability(epsilon: float, k: int) -> float:
    """K-ary randomized response at ε: the true answer is kept with probability e^ε / (e^ε + K − 1)."""
    return 1.0 if k <= 1 else math.exp(epsilon) / (math.exp(epsilon) + k - 1)


def randomized_response(true: int, k: int, epsilon: float, rng: random.Random) -> int:
    """One draw of K-ary randomized response (Warner 1965; label DP as in Ghazi et al., NeurIPS 2021): `true` with
    probability keep_probability(ε, K), else one of the K − 1 others, uniformly. ε-label-DP: any answer is at most e^ε
    times likelier under one true label than under another."""
    if rng.random() < keep_probability(epsilon, k):
        return true
    other = rng.randrange(k - 1)
    return other if other < true else other + 1


def label_store(state_dir: Path, partition: int) -> Path:
    """Where a node keeps its randomized answers (privacy.label_epsilon): its own disk, never sent."""
    return Path(state_dir) / f"partition-{partition}-label-dp.json"


def randomized_answers(samples: list[Sample], candidate_sets: dict[str, list[str]], epsilon: float, seed: int | None = None,
                       store: Path | None = None) -> list[Sample]:
    """privacy.label_epsilon: each sample with its answer replaced by one randomized-response draw over its candidate
    answers (the first n_choices for multiple choice). Draws come from OS entropy; `seed` (privacy.reproducible_noise: tests
    only) seeds each sample's by (seed, sample) instead. `store` (label_store: the node's own disk) keeps every draw
    (sample id -> answer): a sample drawn before keeps its answer in every round, process and run on that node, so each
    answer is released once and ε holds for good; new samples are drawn and added. DataError names a sample whose
    answer is not among its candidates; ConfigError a store drawn at another ε (a second draw would spend ε again)."""
    book = _read_answers(store, epsilon) if store is not None else {}
    out, drawn = [], 0
    for s in samples:
        cands = candidate_sets.get(s.candidates, [])
        cands = cands[: s.n_choices] if s.n_choices else cands
        if s.answer not in cands:
            raise DataError(f"privacy.label_epsilon: sample {s.uid}'s answer {s.answer!r} is not among its {len(cands)} candidate "
                            "answers; randomized response needs a closed answer set")
        if s.uid not in book:
            rng = random.Random(f"{seed}-label-{s.uid}") if seed is not None else random.SystemRandom()
            book[s.uid], drawn = cands[randomized_response(cands.index(s.answer), len(cands), epsilon, rng)], drawn + 1
        elif book[s.uid] not in cands:
            raise DataError(f"privacy.label_epsilon: {store} holds answer {book[s.uid]!r} for sample {s.uid}, not one of its candidates "
                            "(another dataset under the same id?): remove the file to draw again")
        out.append(dataclasses.replace(s, answer=book[s.uid]))
    if store is not None and drawn:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"epsilon": epsilon, "answers": book}))
        os.replace(tmp, store)  # whole or not at all
    return out


def _read_answers(store: Path, epsilon: float) -> dict[str, str]:
    if not store.exists():
        return {}
    kept = json.loads(store.read_text())
    if kept["epsilon"] != epsilon:
        raise ConfigError(f"privacy.label_epsilon: {store} holds answers drawn at epsilon {kept['epsilon']:g}, not {epsilon:g}; drawing "
                          "them again would release each answer twice (the epsilons add up). Keep the setting, or remove the file "
                          "knowingly")
    return dict(kept["answers"])

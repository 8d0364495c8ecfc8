"""What a run counts besides accuracy, each in its own object: the privacy it spends (`PrivacyAccounts`) and the
bytes and memory of each round (`Traffic`). ServerRun (server_app.py) asks them once per round and at the end;
the maths is in fednano/privacy.py and fednano/devices.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from fednano.config import RunConfig
from fednano.devices import peak_host_memory, peak_memory, reset_peak_memory
from fednano.experiments.results import BYTES_FIELDS
from fednano.federation import keys
from fednano.federation.strategy import ClientOutcome
from fednano.methods.registry import client_dp_noise, expected_clients
from fednano.privacy import client_dp_epsilon, dp_sgd_ledger, embedding_privacy, keep_probability, not_private, worst_epsilon
from fednano.runtime.server import ServerSide

log = logging.getLogger("fednano")


def array_bytes(arrays: ArrayRecord) -> int:
    return sum(a.numpy().nbytes for a in arrays.values())


@dataclass(frozen=True)
class PrivacyAccounts:
    """The run's privacy guarantees, from its settings and what the clients report: the clients' own noise
    (privacy.embedding_noise, privacy.label_epsilon), client-level DP (privacy.client_dp: one account for the
    federation) and DP-SGD (privacy.dp_sgd: a ledger per client)."""

    cfg: RunConfig

    @property
    def local(self) -> bool:
        """Whether results.json gets a `privacy` entry for the clients' own noise."""
        p = self.cfg.privacy
        return bool(p.embedding_noise or p.label_epsilon or p.reproducible_noise)

    def local_guarantees(self, side: ServerSide) -> dict[str, object]:
        """results.json `privacy`: what the clients' own noise guarantees (privacy.embedding_noise, privacy.label_epsilon),
        and `private` = false with its reason under privacy.reproducible_noise."""
        p, out = self.cfg.privacy, dict(not_private(self.cfg.privacy))
        if p.embedding_noise:
            out |= embedding_privacy(p.embedding_noise, side.edge.embed_tokens.weight.detach())
            log.info("privacy.embedding_noise=%g: metric LDP with epsilon %.4g per unit distance, %.3g for a typical pair of tokens",
                     out["embedding_noise"], out["epsilon_per_unit_distance"], out["epsilon_typical_token_pair"])
        if p.label_epsilon:
            k = max((len(c) for c in side.task.candidate_sets.values()), default=0) if side.task else 0  # 0: unknown here
            out |= {"label_epsilon": p.label_epsilon, "largest_answer_set": k} | (
                {"label_keep_probability": keep_probability(p.label_epsilon, k)} if k else {})
            log.info("privacy.label_epsilon=%g: randomized response on every client's answers (largest answer set: %d)", p.label_epsilon, k)
        return out

    def round(self, rnd: int, accepted: Sequence[ClientOutcome], rounds: Sequence[dict]) -> dict:
        """The round's entries: `dp_epsilon`, the ε spent so far (privacy.client_dp: by the federation; privacy.dp_sgd: the
        most any client's data has spent), and with DP-SGD `dp_sgd`, each client's ledger (privacy.dp_sgd_ledger) after
        the earlier `rounds` (results.json's)."""
        if not self.cfg.privacy.dp_sgd:
            return {"dp_epsilon": self.epsilon(rnd)}
        replies = {str(o.partition_id): (keys.number(o.metrics[keys.DP_SGD_SIGMA]), keys.number(o.metrics[keys.DP_SGD_RATE]),
                                         int(keys.number(o.metrics[keys.DP_SGD_STEPS]))) for o in accepted}
        earlier = [r.get("dp_sgd") or {} for r in rounds if r["round"] < rnd]
        ledger = dp_sgd_ledger(earlier, replies, self.cfg.privacy.delta)
        return {"dp_epsilon": worst_epsilon([*earlier, ledger]), "dp_sgd": ledger}

    def final(self, last: dict) -> dict:
        """final's `client_dp` / `dp_sgd` entry: the (epsilon, delta) the run spent and the settings it was spent at ({} without)."""
        p = self.cfg.privacy
        if p.dp_sgd:
            return {"dp_sgd": {"epsilon": last["dp_epsilon"], "delta": p.delta, "clip_norm": p.clip_norm,
                               "target_epsilon": p.target_epsilon, "accountant": "opacus RDP", "epsilon_of": "the most-spent client"}}
        if not p.client_dp:
            return {}
        rate = expected_clients(self.cfg) / self.cfg.data.num_clients
        return {"client_dp": {"epsilon": last["dp_epsilon"], "delta": p.delta, "noise_multiplier": client_dp_noise(self.cfg)[0],
                              "clip_norm": p.clip_norm, "sample_rate": rate, "accountant": "opacus RDP"}}

    def epsilon(self, rnd: int) -> float | None:
        """privacy.client_dp: the (epsilon, delta=privacy.delta) spent after `rnd` rounds (Opacus's RDP accountant)."""
        p = self.cfg.privacy
        if not p.client_dp:
            return None
        return client_dp_epsilon(client_dp_noise(self.cfg)[1], expected_clients(self.cfg) / self.cfg.data.num_clients, rnd, p.delta)


@dataclass(frozen=True)
class Traffic:
    """Every byte of a round and its peak memory: the Flower messages' tensors (counted here), each client's
    split-channel bytes and memory (as it reported), and the server process's own."""

    llm_device: torch.device

    def start_round(self) -> None:
        reset_peak_memory(self.llm_device)

    @staticmethod
    def bytes(sent: Sequence[Message], trained: Sequence[ClientOutcome], evaluated: Sequence[ClientOutcome], uploaded: ArrayRecord,
              sends_fisher: bool) -> dict[str, int]:
        """`sent`: the round's messages carrying the global state; `trained` / `evaluated`: the replies of each phase;
        `uploaded`: what one training client sends back (FFA: B only), and its Fisher as large with `sends_fisher`."""
        out = dict.fromkeys(BYTES_FIELDS, 0)
        out["adapters_down"] = sum(array_bytes(m.content.array_records[keys.ARRAYS]) for m in sent)
        out["adapters_up"] = array_bytes(uploaded) * len([o for o in trained if o.metrics])
        out["fisher_up"] = out["adapters_up"] if sends_fisher else 0
        for o in [*trained, *evaluated]:
            for k in keys.BYTES_KEYS:
                out[k] += int(o.metrics.get(k, 0))
        return out

    def memory(self, outcomes: Sequence[ClientOutcome]) -> dict[str, Any]:
        """Peak memory this round: the server process (host RSS, and the LLM's GPU when on CUDA) and each client (as it reported)."""
        out: dict[str, Any] = {"server_peak_rss_bytes": peak_host_memory()}
        gpu = peak_memory(self.llm_device)
        if gpu is not None:
            out["server_peak_gpu_bytes"] = gpu
        for key, name in ((keys.PEAK_RSS_BYTES, "client_peak_rss_bytes"), (keys.PEAK_GPU_BYTES, "client_peak_gpu_bytes")):
            clients = {str(o.partition_id): int(o.metrics[key]) for o in outcomes if key in o.metrics}
            if clients:
                out[name] = clients
        return out

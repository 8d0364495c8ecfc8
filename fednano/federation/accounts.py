"""What a run counts besides accuracy, each in its own object: the privacy it spends (`PrivacyAccounts`) and the
bytes and memory of each round (`Traffic`). ServerRun (server_app.py) asks them once per round and at the end;
the maths is in fednano/privacy.py and fednano/devices.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from fednano.config import RunConfig
from fednano.devices import peak_host_memory, peak_memory, reset_peak_memory
from fednano.experiments.results import BYTES_FIELDS
from fednano.federation import keys
from fednano.federation.strategy import ClientOutcome
from fednano.io import atomic_write_text
from fednano.methods.registry import client_dp_noise, expected_clients
from fednano.privacy import client_dp_epsilon, dp_sgd_ledger, embedding_privacy, keep_probability, not_private, worst_epsilon
from fednano.runtime.server import ServerSide

log = logging.getLogger("fednano")


def array_bytes(arrays: ArrayRecord) -> int:
    return sum(a.numpy().nbytes for a in arrays.values())


SPENT = "privacy_spent.json"  # in the run folder: what the run has spent, written before anything of a round leaves the server


@dataclass
class PrivacyAccounts:
    """The run's privacy guarantees, from its settings and what the clients report: the clients' own noise
    (privacy.embedding_noise, privacy.label_epsilon), client-level DP (privacy.client_dp: one account for the
    federation) and DP-SGD (privacy.dp_sgd: a ledger per client).

    What client_dp and dp_sgd spend is counted when a round's replies are in, before its merged model leaves the
    server, and kept in `spent_file` (the run folder's privacy_spent.json), which resuming never rolls back: a round cut
    short after its model went out to evaluating clients, and run again, is counted twice, as it released twice."""

    cfg: RunConfig
    spent_file: Path | None = None  # None: kept in memory only (tests)
    spent: dict[str, Any] = field(default_factory=lambda: {"releases": 0, "dp_sgd": {}})

    @property
    def spends(self) -> bool:
        return bool(self.cfg.privacy.client_dp or self.cfg.privacy.dp_sgd)

    def begin(self, done: int, rounds: Sequence[dict]) -> None:
        """At the start: a new run has spent nothing; a resumed one (`done` rounds completed, results.json's `rounds`)
        what its spent file says, or, for a run from before that file, what its completed rounds recorded."""
        if not self.spends:
            return
        if done and self.spent_file is not None and self.spent_file.exists():
            self.spent = json.loads(self.spent_file.read_text())
            return
        ledger: dict[str, dict] = {}
        for r in rounds[:done]:
            ledger.update(r.get("dp_sgd") or {})  # (each entry holds the client's total so far)
        self.spent = {"releases": done, "dp_sgd": ledger}
        self._save()

    def spend(self, accepted: Sequence[ClientOutcome]) -> dict:
        """Count the round whose accepted replies these are: one more release under client_dp (every round releases, even
        with no replies), each client's DP-SGD steps under dp_sgd; saved before the caller sends anything of the round.
        Returns the round's results.json entries: `dp_epsilon`, the ε spent so far (client_dp: by the federation; dp_sgd:
        the most any client's data has spent), and with DP-SGD `dp_sgd`, the ledger of the clients that trained in it."""
        if not self.spends:
            return {"dp_epsilon": None}
        self.spent["releases"] += 1
        if not self.cfg.privacy.dp_sgd:
            self._save()
            return {"dp_epsilon": self.epsilon(self.spent["releases"])}
        replies = {str(o.partition_id): (keys.number(o.metrics[keys.DP_SGD_SIGMA]), keys.number(o.metrics[keys.DP_SGD_RATE]),
                                         int(keys.number(o.metrics[keys.DP_SGD_STEPS]))) for o in accepted}
        ledger = dp_sgd_ledger([self.spent["dp_sgd"]], replies, self.cfg.privacy.delta)
        self.spent["dp_sgd"].update(ledger)
        self._save()
        return {"dp_epsilon": worst_epsilon([self.spent["dp_sgd"]]), "dp_sgd": ledger}

    def _save(self) -> None:
        if self.spent_file is not None:
            atomic_write_text(self.spent_file, json.dumps(self.spent, indent=2))

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

    def epsilon(self, releases: int) -> float | None:
        """privacy.client_dp: the (epsilon, delta=privacy.delta) spent after `releases` noised merges (Opacus's RDP accountant)."""
        p = self.cfg.privacy
        if not p.client_dp:
            return None
        return client_dp_epsilon(client_dp_noise(self.cfg)[1], expected_clients(self.cfg) / self.cfg.data.num_clients, releases, p.delta)


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

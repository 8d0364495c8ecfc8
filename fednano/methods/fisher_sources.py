"""What a client computes for the merge besides its weights: no Fisher, a Fisher from an extra
pass (FedNano), or from its training gradients (FedNano-EF). The maths is in client/fisher.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fednano.client.fisher import FisherFromTraining, fisher_pass, fisher_sample_error
from fednano.client.training import StepHook
from fednano.config import TrainConfig
from fednano.runtime.client import ClientJob


@dataclass(frozen=True)
class NoFisher:
    kind = "none"
    sends_fisher = False
    takes_pass = False  # an extra pass after (or, federation.fisher_at = "global", before) training

    def hooks(self) -> list[StepHook]:
        return []

    def fisher(self, job: ClientJob, part: Any, hooks: list[StepHook]) -> dict[str, torch.Tensor] | None:
        return None

    def split_steps(self, cfg: TrainConfig) -> int:
        """Split steps this adds per client and round."""
        return 0


@dataclass(frozen=True)
class FisherPass(NoFisher):
    """FedNano: after local training, an extra pass over `train.fisher_samples` of the client's samples,
    empirical (at the true answers) or exact (over the candidates, `federation.fisher_type`)."""

    kind = "pass"
    sends_fisher = True
    takes_pass = True

    def fisher(self, job: ClientJob, part: Any, hooks: list[StepHook]) -> dict[str, torch.Tensor] | None:
        rt = job.rt
        exact = rt.task.candidate_sets if job.cfg.federation.fisher_type == "exact" else None
        return fisher_pass(rt.edge, part.endpoint(job), job.data.train, rt.work, job.cfg.train, job.generator, exact)

    def split_steps(self, cfg: TrainConfig) -> int:
        return -(-cfg.fisher_samples // cfg.batch_size)


@dataclass(frozen=True)
class FisherOfTraining(NoFisher):
    """FedNano-EF: the mean squared gradient of the training steps (no extra pass, nothing extra sent per step)."""

    kind = "training"
    sends_fisher = True

    def hooks(self) -> list[StepHook]:
        return [FisherFromTraining()]

    def fisher(self, job: ClientJob, part: Any, hooks: list[StepHook]) -> dict[str, torch.Tensor] | None:
        (acc,) = [h for h in hooks if isinstance(h, FisherFromTraining)]
        return acc.fisher()


def diagnostic_fisher(job: ClientJob, part: Any, check: bool) -> tuple[dict[str, torch.Tensor], float | None]:
    """federation.merge_diagnostics: the client's empirical Fisher from train.fisher_samples samples at its current state and,
    with `check`, its relative error against one from 4x as many (None without). The samples come from a stream of their
    own, so that the diagnostics leave the run's training and Fisher draws as they were."""
    seed = job.cfg.federation.seed * 1_000_003 + job.round * 1009 + job.partition
    generator = torch.Generator().manual_seed(seed ^ 0x5EED_D1A6)
    return fisher_sample_error(job.rt.edge, part.endpoint(job), job.data.train, job.rt.work, job.cfg.train, generator,
                               factor=4 if check else 1)

"""Closed-set answer scoring: every candidate's log-likelihood after the prompt, one prompt pass
per batch (the server shares it across candidates through the KV cache)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from fednano.client.features import Workload
from fednano.client.nanoedge import NanoEdge
from fednano.data.prompts import candidate_batch, prompt_batch
from fednano.data.samples import Sample
from fednano.metrics import accuracy_report
from fednano.split.endpoint import LLMEndpoint


@torch.no_grad()
def candidate_scores(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, candidate_sets: dict[str, list[str]], batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
    """(sample index, log-likelihood of each candidate (K,), the candidates) for every sample.

    Samples are scored against their task's candidate set (`Sample.candidates`);
    for multiple choice only the first `n_choices` candidates are valid (the
    others get -inf).
    """
    edge.eval()
    for name in sorted({s.candidates for s in samples}):
        cands = candidate_sets[name]
        cand = candidate_batch(work.tokenizer, cands)
        cand_embeds = edge.embed(cand.input_ids, None)  # (K, L, d): candidates pass NanoAdapter-T too
        group = [i for i, s in enumerate(samples) if s.candidates == name]
        for j in range(0, len(group), batch_size):
            idx = group[j : j + batch_size]
            part = [samples[i] for i in idx]
            batch = prompt_batch(work.tokenizer, [s.content() for s in part], work.n_visual, work.system)
            embeds = edge.embed(batch.input_ids, work.images(part))
            lp = endpoint.score(
                embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask
            ).cpu()  # (B, K), one copy per batch
            for row, s in enumerate(part):
                if s.n_choices:
                    lp[row, s.n_choices :] = float("-inf")
            yield from ((i, lp[row], cands) for row, i in enumerate(idx))
            if on_batch:
                on_batch(len(part))


def evaluate(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    samples: list[Sample],
    work: Workload,
    candidate_sets: dict[str, list[str]],
    batch_size: int,
    categories: tuple[str, ...] = (),
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Closed-set accuracy: the valid candidate with the highest log-likelihood is the prediction."""
    scored = candidate_scores(edge, endpoint, samples, work, candidate_sets, batch_size, on_batch)
    correct = {i: cands[int(lp.argmax())] == samples[i].answer for i, lp, cands in scored}
    return accuracy_report(samples, [correct[i] for i in range(len(samples))], categories)

"""How a client's model is scored on questions.

Closed set (always): every candidate's log-likelihood after the prompt, one prompt pass per batch
(the server shares it across candidates through the KV cache); the most likely valid candidate is the
prediction. Generated (`data.scoring = "generate"`): the model's own greedy answer, decoded by the
LLM with its KV cache (a batch of questions per round trip), counted correct when it equals the reference
after the task's normalisation (`data.answers`). Both scores go in the report."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from fednano.client.features import Workload
from fednano.client.nanoedge import NanoEdge
from fednano.config import DataConfig
from fednano.data.answers import Normaliser, exact_match, vqa_normalise
from fednano.data.prompts import candidate_batch, prompt_batch, stop_tokens
from fednano.data.samples import Sample, Task
from fednano.metrics import accuracy_report, generated_report
from fednano.split.endpoint import Decoding, LLMEndpoint


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
        cand_embeds = edge.embed(cand.input_ids, None, noised=False)  # (K, L, d): public candidates pass NanoAdapter-T, not the noise
        group = [i for i, s in enumerate(samples) if s.candidates == name]
        for j in range(0, len(group), batch_size):
            idx = group[j : j + batch_size]
            part = [samples[i] for i in idx]
            batch = prompt_batch(work.tokenizer, [s.content() for s in part], work.n_visual, work.system)
            feats = work.images(part)
            embeds = edge.embed(batch.input_ids, feats)
            lp = endpoint.score(
                embeds, batch.attention_mask, cand_embeds, cand.input_ids, cand.attention_mask, parts=edge.parts(batch.input_ids, feats)
            ).cpu()  # (B, K), one copy per batch
            for row, s in enumerate(part):
                if s.n_choices:
                    lp[row, s.n_choices :] = float("-inf")
            yield from ((i, lp[row], cands) for row, i in enumerate(idx))
            if on_batch:
                on_batch(len(part))


@torch.no_grad()
def generated_answers(
    edge: NanoEdge, endpoint: LLMEndpoint, samples: list[Sample], work: Workload, max_tokens: int, batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """The model's greedy answer to each sample, in order: each batch's prompt embeddings go to the LLM
    once (one round trip), which decodes up to `max_tokens` tokens for all of them together (each
    token embedded through this NanoEdge's NanoAdapter-T)."""
    edge.eval()
    stop, text_adapter = stop_tokens(work.tokenizer), edge.text_adapter()
    for j in range(0, len(samples), batch_size):
        part = samples[j : j + batch_size]
        batch = prompt_batch(work.tokenizer, [s.content() for s in part], work.n_visual, work.system)
        feats = work.images(part)
        embeds = edge.embed(batch.input_ids, feats)
        parts = edge.parts(batch.input_ids, feats)
        for ids in endpoint.generate(embeds, batch.attention_mask, text_adapter, stop, Decoding(max_new_tokens=max_tokens), parts=parts):
            yield work.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(part))


@dataclass(frozen=True)
class Scoring:
    """How answers are scored beyond the closed set: `answer_tokens` > 0 also generates each answer
    (up to that many tokens) and matches it after its candidate set's normaliser (VQA's by default)."""

    answer_tokens: int = 0
    normalisers: Mapping[str, Normaliser] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: DataConfig, task: Task) -> Scoring:
        return cls(cfg.answer_tokens if cfg.scoring == "generate" else 0, task.normalisers)

    @property
    def passes(self) -> int:
        """Passes over the questions (for progress bars): candidates, and generation if asked."""
        return 2 if self.answer_tokens else 1

    def correct(self, sample: Sample, generated: str) -> bool:
        return exact_match(generated, sample.answer, self.normalisers.get(sample.candidates, vqa_normalise))


def evaluate(
    edge: NanoEdge,
    endpoint: LLMEndpoint,
    samples: list[Sample],
    work: Workload,
    candidate_sets: dict[str, list[str]],
    batch_size: int,
    categories: tuple[str, ...] = (),
    on_batch: Callable[[int], None] | None = None,
    scoring: Scoring = Scoring(),
) -> dict[str, float]:
    """Closed-set accuracy (the valid candidate with the highest log-likelihood is the prediction), and
    with `scoring.answer_tokens` the generated answers' accuracy (`generated_accuracy`, `gen_acc/...`)."""
    scored = candidate_scores(edge, endpoint, samples, work, candidate_sets, batch_size, on_batch)
    correct = {i: cands[int(lp.argmax())] == samples[i].answer for i, lp, cands in scored}
    report = accuracy_report(samples, [correct[i] for i in range(len(samples))], categories)
    if scoring.answer_tokens:
        answers = generated_answers(edge, endpoint, samples, work, scoring.answer_tokens, batch_size, on_batch)
        report.update(generated_report(samples, [scoring.correct(s, a) for s, a in zip(samples, answers, strict=True)], categories))
    return report

"""Free-form answers: the normalisers (hand-computed), the merge of generated scores, and
`evaluate` with data.scoring = "generate" on the tiny backbone."""

from dataclasses import replace

import pytest

from fednano.client.evaluation import Scoring, evaluate, generated_answers
from fednano.client.features import ImageFeatures, Workload
from fednano.data.answers import choice_letter, exact_match, number_normalise, vqa_normalise
from fednano.data.easyvqa import SYSTEM_PROMPT, answer_set, load_split
from fednano.data.samples import Sample
from fednano.metrics import GENERATED, accuracy_report, by_category, generated_report, merge_reports


@pytest.mark.parametrize("text, expected", [
    ("Circle.", "circle"),
    ("  The   RED one! ", "red 1"),  # number words become digits, as in VQA
    ("Yes, it is.", "yes it is"),
    ("two", "2"),
    ("an apple", "apple"),
    ("It dont matter", "it don't matter"),
    ("3.5", "3.5"),
    ("1,000", "1,000"),
    ("a, b", "b"),
    ("(blue)", "blue"),
])
def test_vqa_normalise(text, expected):
    assert vqa_normalise(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("3", "3"), ("3.0", "3"), ("3.50", "3.5"), ("1,000", "1000"), ("Seven", "7"), ("  12. ", "12"),
    ("-2", "-2"), ("-2.50", "-2.5"), ("cat", "cat"), ("nan", "nan"),
])
def test_number_normalise(text, expected):
    assert number_normalise(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("A. a cat", "A"), ("D: 12", "D"), ("The answer is E.", "E"), ("a cat", "cat"),
    ("Because", "because"),
])
def test_choice_letter(text, expected):
    assert choice_letter(text) == expected


def test_exact_match_normalises_both_sides_and_never_matches_an_empty_answer():
    assert exact_match("The circle.", "circle")
    assert exact_match("seven", "7.0", number_normalise)
    assert not exact_match("3", "30", number_normalise)
    assert not exact_match("", "")
    assert not exact_match("...", "")


def test_generated_scores_merge_by_example_and_category_count():
    s = [Sample("a", "q", "x", meta=(("kind", "k1"),)), Sample("b", "q", "y", meta=(("kind", "k2"),))]
    one = {**accuracy_report(s, [True, True], ("kind",)), **generated_report(s, [True, False], ("kind",))}
    assert one[GENERATED] == 0.5 and by_category(one, "gen_acc/") == {"kind=k1": 1.0, "kind=k2": 0.0}
    assert by_category(one) == {"kind=k1": 1.0, "kind=k2": 1.0} and one["n/kind=k2"] == 1.0
    two = {"accuracy": 0.0, "num_examples": 1.0, GENERATED: 1.0, "acc/kind=k2": 0.0, "gen_acc/kind=k2": 1.0, "n/kind=k2": 1.0}
    merged = merge_reports([one, two])
    assert merged[GENERATED] == pytest.approx((0.5 * 2 + 1.0) / 3)
    assert merged["gen_acc/kind=k2"] == pytest.approx(0.5) and merged["gen_acc/kind=k1"] == 1.0
    assert merged["accuracy"] == pytest.approx(2 / 3)
    assert GENERATED not in merge_reports([one, {"accuracy": 1.0, "num_examples": 1.0}])  # only where every client measured it


def test_evaluate_with_generation_scores_the_models_own_answers(tiny_edge, tiny_llm):
    """The generated accuracy counts exactly the samples whose reference equals the model's greedy
    answer: made true for the first two samples by using that answer as the reference."""
    edge, tok = tiny_edge.edge, tiny_edge.tokenizer
    work = Workload(tok, ImageFeatures(edge.vision), edge.num_visual_tokens, SYSTEM_PROMPT)
    samples = list(load_split("test")[:4])
    answers = list(generated_answers(edge, tiny_llm, samples, work, max_tokens=4))
    assert len(answers) == 4 and all(len(tok(a, add_special_tokens=False)["input_ids"]) <= 4 for a in answers)
    # the references of the first two become the model's own answers; the last two an answer it cannot give
    samples = [replace(s, answer=answers[i] if i < 2 else "no such answer at all") for i, s in enumerate(samples)]
    sets = {"answers": answer_set()}
    closed = evaluate(edge, tiny_llm, samples, work, sets, batch_size=4)
    both = evaluate(edge, tiny_llm, samples, work, sets, batch_size=4, scoring=Scoring(answer_tokens=4))
    assert GENERATED not in closed and both["accuracy"] == closed["accuracy"]
    expected = sum(bool(vqa_normalise(a)) for a in answers[:2]) / 4  # an empty generated answer never counts
    assert both[GENERATED] == expected


def test_scoring_follows_the_config_and_the_tasks_normalisers(tiny_cfg):
    task_norm = {"fill": number_normalise}
    off = Scoring.of(tiny_cfg.data, replace_task(task_norm))
    on = Scoring.of(replace(tiny_cfg.data, scoring="generate", answer_tokens=5), replace_task(task_norm))
    assert (off.answer_tokens, off.passes) == (0, 1) and (on.answer_tokens, on.passes) == (5, 2)
    fill = Sample("f", "q", "7", candidates="fill")
    assert on.correct(fill, "7.0") and on.correct(fill, "seven") and not on.correct(fill, "70")
    assert on.correct(Sample("v", "q", "circle"), "A circle.")  # the default: VQA's normalisation


def replace_task(normalisers):
    from fednano.data.samples import Task

    return Task("t", [], [], {}, "", normalisers=normalisers)


"""Free-form answers, normalised so that a generated answer can be compared with the reference by
exact match (pure functions; `data.scoring = "generate"`).

    vqa_normalise      the VQA evaluation's normalisation: lower case, punctuation removed (a period or
                       comma between digits kept), number words to digits, articles dropped, common
                       contractions restored ("dont" -> "don't"), whitespace collapsed
    number_normalise   IconQA's fill-in-the-blank answers are numbers: VQA normalisation, then thousands
                       separators dropped and a number written canonically ("3.50" -> "3.5", "7.0" -> "7")
    choice_letter      multiple choice: the option letter the answer starts with ("B", "(B)", "B. cat",
                       "The answer is B") -> "B"; anything else is normalised as VQA

A task names one normaliser per candidate set (`Task.normalisers`); both sides of the comparison go
through the same one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

Normaliser = Callable[[str], str]

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                 "isnt": "isn't", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
                 "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
                 "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:'~|]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")


def vqa_normalise(text: str) -> str:
    s = _COMMA_IN_NUMBER.sub("\0", " ".join(text.lower().split()))
    s = _PERIOD.sub("", _PUNCT.sub("", s)).replace("\0", ",")
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def number_normalise(text: str) -> str:
    for s in (text.strip().rstrip(".").replace(",", ""), vqa_normalise(text).replace(",", "")):  # "-2.50"; "seven"
        try:
            value = float(s)
        except ValueError:
            continue
        if math.isfinite(value):
            return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return vqa_normalise(text)


# "(b)", "B", "B. cat", "b." - but a lower-case "a" before a word is the article
_LETTER = re.compile(r"^(?i:the answer is\s*|answer\s*:?\s*)?(?:\(([A-Ja-j])\)|([A-J])(?=[.:)\s]|$)|([a-j])(?=[.:)]|$))")


def choice_letter(text: str) -> str:
    m = _LETTER.match(text.strip())
    return next(g for g in m.groups() if g).upper() if m else vqa_normalise(text)


def exact_match(generated: str, reference: str, normalise: Normaliser = vqa_normalise) -> bool:
    """The generated answer equals the reference after both are normalised (an empty answer never matches)."""
    got = normalise(generated)
    return bool(got) and got == normalise(reference)

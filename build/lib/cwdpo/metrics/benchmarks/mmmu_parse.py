"""MMMU's answer parsing and matching, rule for rule as the MMMU repo's `eval_utils.py` and
lmms-eval's `mmmu/utils.py` do it (our own code).

Multiple choice: strip edge punctuation, pad with spaces; candidates are the letters written
"(A)", else "A " (a letter followed by a space), else "A."; with none and a response of more
than 5 words, the options whose text appears in it; several candidates → the one whose last
occurrence is latest; none → a random letter. The reference draws from one global
`random.seed(42)` stream (so a pick depends on the order items are scored in); here each
item's draw is seeded by (seed, item id), so a subset, a shard or a re-scoring draws the same
letter for the same item.

Open questions: key sub-responses (the text after "is", "so", "therefore", "answer", ... and
"=" in the last sentence), plus every number in them; numbers normalized to floats rounded to
2 decimals (commas dropped), strings lower-cased; correct if a normalized gold number equals a
predicted number, or a gold string is a substring of a predicted string.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}

Normalized = str | float


def parse_multi_choice(
    response: str, options: Sequence[str], seed: int = 42, item_id: str = ""
) -> str:
    """The option letter a free-text `response` picks among `options` (A, B, ... in order)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    index2ans = dict(zip(letters, options))
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    bracketed = [c for c in letters if f"({c})" in response]
    candidates, by_text = bracketed, False
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        low = response.lower()
        candidates = [c for c in letters if index2ans[c].lower() in low]
        by_text = bool(candidates)
    if not candidates:
        return random.Random(f"{seed}:{item_id}").choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        pos = [response.rfind(f"({c})") for c in candidates]
    else:  # the reference looks for " X " here, even for candidates found as "X " or "X."
        pos = [response.rfind(f" {c} ") for c in candidates]
    return candidates[max(range(len(pos)), key=lambda i: (pos[i], -i))]


def extract_numbers(text: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, and plain ones, in that order."""
    return _COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list[Normalized]:
    """A number → [its float rounded to 2 decimals]; a string → [lower-cased]; a one-character
    string → [" x", "x "] (so it only matches as a word edge)."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for i, sub in enumerate(subs):
        indicators = [*_KEYS, "="] if i == len(subs) - 1 else list(_KEYS)
        shortest = ""  # as the reference: an empty tail is replaced by the next one found
        for ind in indicators:
            if ind in sub:
                tail = sub.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[Normalized]:
    """Every normalized candidate answer in an open response (set semantics, as the reference)."""
    keys = _key_responses(response)
    raw = keys + [n for k in keys for n in extract_numbers(k)]
    out: list[Normalized] = []
    for r in raw:
        for v in normalize(r):
            if v not in out:
                out.append(v)
    return out


def open_correct(gold: str | Sequence[str], preds: Sequence[Normalized]) -> bool:
    """Whether an open answer matches: equal numbers, or a gold string inside a predicted one."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [v for g in golds for v in normalize(str(g))]
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif p in norm:
            return True
    return False

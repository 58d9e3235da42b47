"""Is an LLM's answer a usable minimal perturbation of a caption? (pure text, no network)

Why its own module: the model writing the negatives (`cwdpo.perturb`) is asked for one wrong
detail and nothing else, but real models add preambles ("Sure! Here is the caption:"), quotes,
labels and explanations, answer with the caption unchanged, with a correct reference of the
image, or rewrite the whole sentence. A negative that is not wrong, or not *minimally* wrong,
poisons a preference pair silently, so every answer passes `check_perturbation` before it is
kept: decoration is stripped where it can be told apart from the caption, and refused where
it cannot; what is left must differ from the chosen caption and every reference (normalised:
case, punctuation, spacing) and lie within a word-level edit distance of the chosen one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cwdpo.data.records import normalize

#: Why an answer was refused; the words the retry prompt and the summary use.
REASONS: dict[str, str] = {
    "empty": "the answer was empty",
    "malformed": "the answer was not a single caption (several lines, a diff or an explanation)",
    "unchanged": "it means the same as the original caption",
    "reference": "it says the same as one of the correct captions",
    "too_far": "it changes more words than allowed",
}

_PREAMBLE = re.compile(
    r"^(?:sure|okay|ok|certainly|of course|absolutely|alright|here(?:'s| is| are)|below is"
    r"|(?:the |a |my )?(?:minimally )?(?:perturbed|rewritten|modified|altered|changed|new|edited)"
    r"(?: version of the)? caption)\b",
    re.IGNORECASE,
)
_LABEL = re.compile(
    r"^(?:(?:minimally |the )?(?:perturbed|rewritten|modified|altered|changed|new|edited|wrong)"
    r"\s+)?(?:caption|answer|output|result)\s*:\s*",
    re.IGNORECASE,
)
_EXPLANATION_LINE = re.compile(
    r"^(?:\(|explanation\b|note\b|reason\b|changes?\b|changed\b|modification\b"
    r"|i (?:changed|replaced|swapped|modified|altered)\b|this (?:changes|replaces|alters)\b"
    r"|(?:the |only )?change\b)",
    re.IGNORECASE,
)
_TRAILING_NOTE = re.compile(
    r"\s*(?:\((?:changed|replaced|swapped|was|instead of|from|original|note|altered)\b[^()]*\)"
    r"|\s[-–—]+\s*(?:changed|replaced|swapped|note)\b.*)\s*$",
    re.IGNORECASE,
)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("`", "`")]
_DIFF = re.compile(r"->|→|=>")


@dataclass(frozen=True)
class Cleaned:
    """The caption inside an answer (None when there is none) and why not, or what was cut."""

    text: str | None
    reason: str | None = None  # "empty" | "malformed" when text is None
    stripped: bool = False  # a preamble, label, quotes or an explanation was removed


@dataclass(frozen=True)
class Verdict:
    """`check_perturbation`'s answer: the cleaned text and, when refused, the reason."""

    text: str | None
    reason: str | None
    distance: int | None = None  # word edits from the chosen caption
    stripped: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


def _unwrap(line: str) -> str:
    """Markdown emphasis and one or more layers of matching quotes around the whole line."""
    while True:
        new = line.strip().strip("*_").strip()
        for left, right in _QUOTES:
            if len(new) >= 2 and new.startswith(left) and new.endswith(right):
                new = new[len(left) : len(new) - len(right)].strip()
                break
        if new == line:
            return new
        line = new


def _lines(answer: str) -> list[str]:
    text = re.sub(r"^```\w*\s*$", "", answer.strip(), flags=re.MULTILINE)
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def clean_answer(answer: str) -> Cleaned:
    """The one caption in an LLM answer: a leading preamble line ("Sure! Here it is:"), a
    label ("Perturbed caption: ..."), quotes, markdown and trailing explanation lines or
    parenthesised notes are removed; an answer with several candidate lines, a diff
    ("red -> blue") or nothing left is refused ("malformed" / "empty")."""
    lines = _lines(answer)
    if not lines:
        return Cleaned(None, "empty")
    if len(lines) > 1 and (lines[0].endswith(":") or _PREAMBLE.match(lines[0])):
        lines = lines[1:]
    cut = next((i for i, ln in enumerate(lines) if i and _EXPLANATION_LINE.match(ln)), None)
    lines = lines[:cut] if cut is not None else lines
    if len(lines) != 1:
        return Cleaned(None, "malformed")
    line = lines[0]
    if ":" in line and _PREAMBLE.match(line) and not _LABEL.match(line):
        line = line.split(":", 1)[1]  # "Sure, here is the caption: ..."
    line = _LABEL.sub("", _unwrap(line))
    line = _unwrap(_TRAILING_NOTE.sub("", _unwrap(line)))
    if not line:
        return Cleaned(None, "empty")
    closing = dict(_QUOTES).get(line[:1])
    if _DIFF.search(line) or (closing is not None and closing not in line[1:]):
        return Cleaned(None, "malformed")  # a diff, or a quote opened and never closed
    return Cleaned(line, None, stripped=line != answer.strip())


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the normalised word sequences of `a` and `b` (a word
    inserted, deleted or replaced counts 1; case and punctuation do not count)."""
    x, y = normalize(a).split(), normalize(b).split()
    prev = list(range(len(y) + 1))
    for i, wx in enumerate(x, start=1):
        cur = [i]
        for j, wy in enumerate(y, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wx != wy)))
        prev = cur
    return prev[-1]


def check_text(
    text: str, chosen: str, references: Sequence[str], max_edit_words: int
) -> tuple[str | None, int]:
    """(the refusal reason or None, the word distance) of an already clean candidate."""
    norm = normalize(text)
    if norm == normalize(chosen):
        return "unchanged", 0
    if norm in {normalize(r) for r in references}:
        return "reference", word_edit_distance(chosen, text)
    distance = word_edit_distance(chosen, text)
    return ("too_far" if distance > max_edit_words else None), distance


def check_perturbation(
    answer: str, chosen: str, references: Sequence[str], max_edit_words: int
) -> Verdict:
    """Clean `answer` (`clean_answer`) and accept it as a negative of `chosen` only when it
    differs from `chosen` and from every one of `references` after normalisation and is at
    most `max_edit_words` word edits away from `chosen`."""
    if max_edit_words < 1:
        raise ValueError(f"max_edit_words must be >= 1, got {max_edit_words}")
    cleaned = clean_answer(answer)
    if cleaned.text is None:
        return Verdict(None, cleaned.reason, None, cleaned.stripped)
    reason, distance = check_text(cleaned.text, chosen, references, max_edit_words)
    return Verdict(cleaned.text, reason, distance, cleaned.stripped)

"""COCO caption tokenization: the Stanford PTB tokenizer (Java) or a pure-Python approximation.

Why its own module: every caption score (CaptionMetrics, the reference win-rate judge) must
tokenize exactly as COCO evaluation does, and must say which tokenizer ran, so numbers from the
Java and the fallback path are never silently mixed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from typing import Literal

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

TokenizerName = Literal["ptb", "python"]


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def resolve_tokenizer(tokenizer: str = "auto") -> TokenizerName:
    """Map ``"auto" | "ptb" | "python"`` to the tokenizer that will actually run.

    ``auto`` picks PTB when Java is available (the standard), else the Python fallback. Asking for
    ``ptb`` without Java is an error rather than a silent switch.
    """
    if tokenizer == "auto":
        return "ptb" if java_available() else "python"
    if tokenizer == "ptb":
        if not java_available():
            raise RuntimeError("tokenizer='ptb' needs Java (`java` not found on PATH)")
        return "ptb"
    if tokenizer == "python":
        return "python"
    raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")


_PUNCT = frozenset(PUNCTUATIONS)  # the exact list PTBTokenizer drops after tokenizing
# PTB rewrites brackets to these tokens; with -lowerCase they are lowercase and so *not* in
# PUNCTUATIONS (which has "-LRB-"), i.e. COCO evaluation keeps them. We mimic that.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co."}
    | {"ltd.", "no.", "ft.", "mt.", "approx."}
)
_SPLIT_WORDS = {"gonna": "gon na", "wanna": "wan na", "gotta": "got ta", "cannot": "can not"}
_CLITICS = frozenset({"n't", "'s", "'m", "'re", "'ve", "'ll", "'d"})
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
_ALWAYS_SPLIT = re.compile(r"([;#$%*]|[!?]+)")
_SPLIT_UNLESS_NUMBER = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
_DROP = re.compile(r"\.{2,}|-{2,}|[\"`\u2013\u2014\u201c\u201d]")


def python_ptb_tokenize(text: str) -> str:
    """Pure-Python approximation of ``PTBTokenizer -preserveLines -lowerCase`` + punctuation removal.

    Used only when Java is missing. It lowercases, splits the punctuation PTB splits off
    (``, ; # $ % *`` and runs of ``!?``; commas/colons inside numbers stay), turns brackets into ``-lrb-``-style
    tokens like PTB, splits clitics (``don't -> do n't``, ``dog's -> dog 's``), splits a final
    period except on abbreviations (``mr.``, ``u.s.``), drops characters outside the BMP (PTB cannot
    tokenize them) and finally removes exactly pycocoevalcap's ``PUNCTUATIONS`` list. On ordinary
    captions the output equals PTB's; exotic inputs may differ slightly.
    """
    text = "".join(ch for ch in text.lower() if ord(ch) <= 0xFFFF)
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = _DROP.sub(" ", text)
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = _SPLIT_UNLESS_NUMBER.sub(lambda m: f" {m.group(0)} ", text)
    out: list[str] = []
    for raw in text.split():
        tok = raw
        if tok in _SPLIT_WORDS:
            out.extend(_SPLIT_WORDS[tok].split())
            continue
        if tok in _CLITICS:
            out.append(tok)
            continue
        tok = tok.strip("'")
        if (
            len(tok) > 1
            and tok.endswith(".")
            and tok not in _ABBREVIATIONS
            and "." not in tok[:-1]
            and not re.fullmatch(r"[a-z]\.", tok)
        ):
            tok = tok[:-1]
        m = _CONTRACTION.match(tok)
        pieces = [m.group(1), m.group(2)] if m else [tok]
        out.extend(p for p in pieces if p and p not in _PUNCT)
    return " ".join(out)


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Run pycocoevalcap's ``PTBTokenizer`` once (one JVM) over all captions, order preserved."""
    # Any line/paragraph separator would shift PTB's one-line-per-caption output, so whitespace
    # runs are collapsed first (tokenization is whitespace-insensitive, results are unchanged).
    cleaned = {i: [{"caption": " ".join(c.split())}] for i, c in enumerate(captions)}
    try:
        # PTBTokenizer writes a temp file next to its jar (inside site-packages)
        out = PTBTokenizer().tokenize(cleaned)
    except OSError as err:
        raise RuntimeError(
            f"PTB tokenization failed ({err}); pycocoevalcap's tokenizer directory must be "
            "writable, or use tokenizer='python'"
        ) from err
    if len(out) != len(captions):
        raise RuntimeError(
            f"PTBTokenizer returned {len(out)} lines for {len(captions)} captions "
            "(is Java working and pycocoevalcap's package directory writable?)"
        )
    return [out[i][0] for i in range(len(captions))]


def tokenize_captions(
    captions: Sequence[str], tokenizer: str = "auto"
) -> tuple[list[str], TokenizerName]:
    """Tokenize like COCO evaluation; returns ``(tokenized, tokenizer_actually_used)``."""
    name = resolve_tokenizer(tokenizer)
    if not captions:
        return [], name
    if name == "ptb":
        return ptb_tokenize(captions), name
    return [python_ptb_tokenize(c) for c in captions], name

"""Pairwise win rate of system A over system B with a bootstrap CI, plus judges that decide each pair.

Why: preference fine-tuning is judged by head-to-head comparisons (CW-DPO vs DPO captions on the
same images). :class:`WinRate` aggregates per-item outcomes (1 = A wins, 0.5 = tie, 0 = B wins;
ties count half) and reports a percentile-bootstrap confidence interval so small differences are
not over-read. Judges turn two lists of outputs into those outcomes:

* :class:`ReferenceJudge`: per-image CIDEr-D against the human references (no model needed).
* :class:`ScoreJudge` / :class:`FactsJudge`: any ``score_fn(caption, item) -> float`` (e.g. the
  ShapesWorld fact checker); higher wins.
* :class:`HttpJudge`: an LLM behind an OpenAI-compatible ``/chat/completions`` endpoint, with the
  A/B order randomized per item to cancel position bias. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from pycocoevalcap.cider.cider import Cider
from torch import Tensor
from torchmetrics import Metric

from cwdpo.metrics.caption_tokenizer import tokenize_captions

__all__ = [
    "FactsJudge",
    "HttpJudge",
    "HttpJudgeError",
    "Judge",
    "ReferenceJudge",
    "ScoreJudge",
    "WinRate",
    "bootstrap_win_rate_ci",
    "compare_scores",
    "parse_verdict",
]


# --------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------
def bootstrap_win_rate_ci(
    wins: int, ties: int, losses: int, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the win rate ``(wins + ties / 2) / n``.

    Resampling n items with replacement from data that takes only three values is the same as
    drawing the resampled (wins, ties, losses) counts from ``Multinomial(n, counts / n)``, so the
    bootstrap is exact, O(n_boot) memory, and deterministic for a given ``seed``
    (``numpy.random.default_rng(seed).multinomial``; quantiles with numpy's default linear rule).
    """
    n = wins + ties + losses
    if n <= 0:
        raise ValueError("bootstrap needs at least one outcome")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.array([wins, ties, losses], dtype=np.float64) / n, size=n_boot)
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
    alpha = 1.0 - confidence
    low, high = np.quantile(rates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


class WinRate(Metric):
    """Win rate of A over B (ties count half) with a percentile-bootstrap confidence interval.

    ``update(outcomes)`` takes per-item outcomes in {1.0 (A wins), 0.5 (tie), 0.0 (B wins)}.
    ``compute()`` returns ``win_rate`` (a fraction in [0, 1]), ``ci_low``/``ci_high`` (``confidence``
    level, ``n_boot`` resamples, deterministic given ``seed``), ``n``, ``wins``, ``ties``, ``losses``.
    State is three counters with sum reduction, so DDP sync is exact and tiny.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.n_boot, self.seed, self.confidence = n_boot, seed, confidence
        for name in ("wins", "ties", "losses"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outcomes: Tensor | Sequence[float]) -> None:
        """Add per-item outcomes (1.0 A wins, 0.5 tie, 0.0 B wins)."""
        out = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
        valid = (out == 0.0) | (out == 0.5) | (out == 1.0)
        if not bool(valid.all()):
            bad = out[~valid][:5].tolist()
            raise ValueError(f"outcomes must be 1.0 (A wins), 0.5 (tie) or 0.0 (B wins); got {bad}")
        self.wins += int((out == 1.0).sum())
        self.ties += int((out == 0.5).sum())
        self.losses += int((out == 0.0).sum())

    def compute(self) -> dict[str, float]:
        """Point estimate, bootstrap CI and counts; raises if no outcomes were added."""
        wins, ties, losses = int(self.wins), int(self.ties), int(self.losses)
        n = wins + ties + losses
        if n == 0:
            raise ValueError("WinRate.compute() has no data: call update(outcomes) first")
        low, high = bootstrap_win_rate_ci(
            wins, ties, losses, self.n_boot, self.seed, self.confidence
        )
        return {
            "win_rate": (wins + 0.5 * ties) / n,
            "ci_low": low,
            "ci_high": high,
            "n": n,
            "wins": wins,
            "ties": ties,
            "losses": losses,
        }


# --------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------
class Judge(Protocol):
    """Anything that turns paired outputs into per-item outcomes (1 A wins, 0.5 tie, 0 B wins)."""

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]: ...


def compare_scores(score_a: float, score_b: float, tol: float = 0.0) -> float:
    """1.0 if ``score_a`` beats ``score_b`` by more than ``tol``, 0.0 if the reverse, else 0.5."""
    if math.isnan(score_a) or math.isnan(score_b):
        raise ValueError(f"cannot compare NaN scores ({score_a}, {score_b})")
    if score_a - score_b > tol:
        return 1.0
    if score_b - score_a > tol:
        return 0.0
    return 0.5


def _check_lengths(outputs_a: Sequence[str], outputs_b: Sequence[str], items: Sequence) -> None:
    if not len(outputs_a) == len(outputs_b) == len(items):
        raise ValueError(
            f"outputs_a ({len(outputs_a)}), outputs_b ({len(outputs_b)}) and items ({len(items)}) "
            "must have the same length"
        )


class ReferenceJudge:
    """Per-image CIDEr-D of each candidate against ``item["references"]``; higher wins.

    The CIDEr IDF is computed over the references of all items in the call (both candidates share
    it), using pycocoevalcap's ``Cider`` and the same tokenization as :class:`CaptionMetrics`
    (``tokenizer="auto"``: PTB with Java, else the Python fallback). ``tol`` is an absolute CIDEr
    margin (raw scale, 0..10) below which the pair is a tie; exactly equal scores always tie.
    """

    name = "reference"

    def __init__(self, tokenizer: str = "auto", tol: float = 0.0) -> None:
        self.tokenizer, self.tol = tokenizer, tol
        self.last_tokenizer: str | None = None

    def scores(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> tuple[list[float], list[float]]:
        """Per-item CIDEr-D (raw scale) of A and of B."""
        _check_lengths(outputs_a, outputs_b, items)
        refs = []
        for i, item in enumerate(items):
            r = item.get("references")
            r = [r] if isinstance(r, str) else list(r or [])
            if not r:
                raise ValueError(f"item {i} has no 'references'")
            refs.append(r)
        n = len(items)
        flat = list(outputs_a) + list(outputs_b) + [x for rs in refs for x in rs]
        tokens, self.last_tokenizer = tokenize_captions(flat, self.tokenizer)
        gts, pos = {}, 2 * n
        for i, rs in enumerate(refs):
            gts[i] = tokens[pos : pos + len(rs)]
            pos += len(rs)
        _, sa = Cider().compute_score(gts, {i: [tokens[i]] for i in range(n)})
        _, sb = Cider().compute_score(gts, {i: [tokens[n + i]] for i in range(n)})
        return [float(x) for x in sa], [float(x) for x in sb]

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]:
        if not items:
            _check_lengths(outputs_a, outputs_b, items)
            return []
        sa, sb = self.scores(outputs_a, outputs_b, items)
        return [compare_scores(a, b, self.tol) for a, b in zip(sa, sb)]


class ScoreJudge:
    """Generic judge: ``score_fn(caption, item) -> float`` for each side; higher wins.

    Scores whose difference is at most ``tol`` tie. ``name`` labels the judge in logs.
    """

    def __init__(
        self, score_fn: Callable[[str, dict], float], name: str = "score", tol: float = 0.0
    ) -> None:
        self.score_fn, self.name, self.tol = score_fn, name, tol

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]:
        _check_lengths(outputs_a, outputs_b, items)
        return [
            compare_scores(float(self.score_fn(a, it)), float(self.score_fn(b, it)), self.tol)
            for a, b, it in zip(outputs_a, outputs_b, items)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tol={self.tol})"


class FactsJudge(ScoreJudge):
    """:class:`ScoreJudge` for a fact checker (e.g. ShapesWorld: fraction of true statements)."""

    def __init__(
        self, score_fn: Callable[[str, dict], float], name: str = "facts", tol: float = 0.0
    ) -> None:
        super().__init__(score_fn, name=name, tol=tol)


_VERDICT_EXACT = re.compile(r"^(a|b|tie)$")
_VERDICT_LABELLED = re.compile(
    r"\b(?:answer|verdict|winner|choice|better(?: caption)?|final)\b\s*(?:is|:|=|-)?\s*"
    r"(?:caption\s+)?\(?([ab]|tie)\)?(?![\w])"
)
_VERDICT_CAPTION = re.compile(r"\bcaption\s+\(?([ab])\)?\s+is\s+better\b")


def parse_verdict(text: str) -> str | None:
    """Parse a judge reply into ``"A"``, ``"B"``, ``"tie"`` or None (unparseable).

    Accepts the bare answer with decoration (``"A"``, ``"**B**"``, ``"Tie."``, ``"(a)"``), a
    labelled answer (``"Answer: B"``, ``"The better caption is A"``, ``"Caption B is better"``) and
    tie synonyms (``"equal"``, ``"draw"``, ``"both"``). Free text is not guessed at: an English
    article "a" must not be read as a vote.
    """
    norm = text.strip().lower()
    bare = re.sub(r"[\s*_`'\"().,:;!\[\]]+", " ", norm).strip()
    if m := _VERDICT_EXACT.match(bare):
        return {"a": "A", "b": "B", "tie": "tie"}[m.group(1)]
    if bare in {"equal", "draw", "both", "neither", "same", "a tie", "it's a tie", "tied"}:
        return "tie"
    cleaned = re.sub(r"[*_`\"']+", "", norm)
    hits = {m.group(1) for m in _VERDICT_LABELLED.finditer(cleaned)}
    hits |= {m.group(1) for m in _VERDICT_CAPTION.finditer(cleaned)}
    if len(hits) == 1:
        return {"a": "A", "b": "B", "tie": "tie"}[hits.pop()]
    return None


class HttpJudgeError(RuntimeError):
    """An HTTP judge request failed (the message names the URL and status, never the API key)."""


class HttpJudge:
    """LLM judge behind an OpenAI-compatible chat-completions endpoint (``POST {url}/chat/completions``).

    The prompt shows the references (``item["references"]``; optional ``item["prompt"]``) and the two
    candidates labelled A and B; the order is randomized per item with ``random.Random(seed)`` and
    mapped back, so position bias averages out. The model must answer exactly "A", "B" or "tie";
    anything :func:`parse_verdict` cannot read counts as a tie and increments :attr:`n_unparsed`.

    The API key is read from the environment variable ``api_key_env`` at request time (sent as a
    Bearer token when set) and never stored on the object, so it cannot leak through ``repr``,
    logged hyperparameters or error messages. Network errors, HTTP 429 and 5xx are retried
    ``max_retries`` times with exponential back-off; other HTTP errors raise :class:`HttpJudgeError`.
    ``request_options`` is merged into the JSON body (default ``{"temperature": 0}``).
    """

    name = "http"
    SYSTEM_PROMPT = "You are a careful, impartial judge of image captions."

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 2,
        seed: int = 0,
        backoff: float = 0.5,
        request_options: dict[str, Any] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.seed = seed
        self.backoff = backoff
        self.request_options = {"temperature": 0} if request_options is None else request_options
        self.n_unparsed = 0
        self.n_requests = 0
        self._rng = random.Random(seed)

    @property
    def endpoint(self) -> str:
        return f"{self.url}/chat/completions"

    def __repr__(self) -> str:
        return (
            f"HttpJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"timeout={self.timeout}, max_retries={self.max_retries}, seed={self.seed})"
        )

    def build_prompt(self, first: str, second: str, item: dict) -> str:
        """User message showing the references and the candidates labelled A (first) and B."""
        lines = []
        if item.get("prompt"):
            lines += [f"Instruction given to the captioner: {item['prompt']}", ""]
        refs = item.get("references") or []
        refs = [refs] if isinstance(refs, str) else list(refs)
        if refs:
            lines.append("Reference captions written by people who saw the image:")
            lines += [f"- {r}" for r in refs]
            lines.append("")
        lines += [
            f"Caption A: {first}",
            f"Caption B: {second}",
            "",
            "Which caption describes the image better, judged against the references "
            "(correct objects, attributes, counts and relations; no invented details; fluent)? "
            'Reply with exactly one word: "A", "B" or "tie".',
        ]
        return "\n".join(lines)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = "Bearer " + os.environ[self.api_key_env]
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.endpoint, data=body, headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                self.n_requests += 1
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise HttpJudgeError(
                        f"HttpJudge: POST {self.endpoint} returned a non-JSON body"
                    ) from None
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} {err.reason}"
                err.close()
                if err.code != 429 and err.code < 500:
                    break
            except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(err).__name__}: {reason}"
        raise HttpJudgeError(
            f"HttpJudge: POST {self.endpoint} failed ({last}) after {attempt + 1} attempt(s)"
        )

    def judge_one(self, output_a: str, output_b: str, item: dict) -> float:
        """Ask the model about one pair; returns 1.0 / 0.5 / 0.0 from A's point of view."""
        swap = self._rng.random() < 0.5
        first, second = (output_b, output_a) if swap else (output_a, output_b)
        payload = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.SYSTEM_PROMPT},
                {"role": "user", "content": self.build_prompt(first, second, item)},
            ],
            **self.request_options,
        }
        data = self._post(payload)
        try:
            content = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise HttpJudgeError(
                f"HttpJudge: POST {self.endpoint} returned no choices[0].message.content"
            ) from None
        verdict = parse_verdict(str(content))
        if verdict is None:
            self.n_unparsed += 1
            return 0.5
        if verdict == "tie":
            return 0.5
        first_wins = verdict == "A"
        return 1.0 if first_wins != swap else 0.0

    def __call__(
        self, outputs_a: list[str], outputs_b: list[str], items: list[dict]
    ) -> list[float]:
        _check_lengths(outputs_a, outputs_b, items)
        return [self.judge_one(a, b, it) for a, b, it in zip(outputs_a, outputs_b, items)]

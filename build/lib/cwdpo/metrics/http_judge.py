"""An OpenAI-compatible ``/chat/completions`` client and the LLM judge behind it (standard
library only).

Why its own module: it is the one place with network, retries and a secret (the API key, never
stored); the judge adds a reply parser, and the A/B order is randomized per item to cancel
position bias. `cwdpo.perturb` writes minimal perturbations through the same client.
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
from collections.abc import Callable
from typing import Any

from cwdpo.metrics.judges import check_lengths

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


class HttpChatError(RuntimeError):
    """A chat-completions request failed (the message names the URL and status, never the API key).

    `reason` says how, for callers that count failures: "timeout", "connection", "http_<code>"
    or "bad_response"."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class HttpJudgeError(HttpChatError):
    """An HTTP judge request failed (the message names the URL and status, never the API key)."""


def retry_after(headers: Any, cap: float = 60.0) -> float:
    """Seconds a 429 / 503 reply asks the client to wait (`Retry-After: <seconds>`), at most
    `cap`; 0 when absent or not a number (an HTTP date is not honoured: back-off applies)."""
    try:
        seconds = float(headers.get("Retry-After", 0) or 0)
    except (TypeError, ValueError, AttributeError):
        return 0.0
    return min(seconds, cap) if math.isfinite(seconds) and seconds > 0 else 0.0


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint (``POST {url}/chat/completions``).

    Why apart from the judge: the judge and the perturbation writer (`cwdpo.perturb`) share the
    transport — key handling, retries, back-off, error messages — and differ only in the prompt
    and how the reply is read. The API key is read from the environment variable ``api_key_env``
    at request time (sent as a Bearer token when set) and never stored on the object, so it
    cannot leak through ``repr``, logged hyperparameters or error messages. Network errors,
    timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with exponential back-off
    (``backoff · 2^k`` seconds, longer when the reply's ``Retry-After`` asks for it); other HTTP
    errors raise at once. ``request_options`` is merged
    into the JSON body (default ``{"temperature": 0}``). Requests hold no shared state (bar the
    approximate ``n_requests`` counter), so several threads may call one client.
    """

    error: type[HttpChatError] = HttpChatError

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 2,
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
        self.backoff = backoff
        self.request_options = {"temperature": 0} if request_options is None else request_options
        self.n_requests = 0

    @property
    def endpoint(self) -> str:
        return f"{self.url}/chat/completions"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={self.url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, "
            f"max_retries={self.max_retries})"
        )

    def _post(
        self, payload: dict[str, Any], on_retry: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """The decoded JSON reply; `on_retry(reason)` is called before each retry."""
        name = type(self).__name__
        body = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = "Bearer " + os.environ[self.api_key_env]
        last, reason, hint = "", "error", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                if on_retry is not None:
                    on_retry(reason)
                time.sleep(max(self.backoff * 2 ** (attempt - 1), hint))
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
                    raise self.error(
                        f"{name}: POST {self.endpoint} returned a non-JSON body", "bad_response"
                    ) from None
            except urllib.error.HTTPError as err:
                last, reason = f"HTTP {err.code} {err.reason}", f"http_{err.code}"
                hint = retry_after(err.headers)
                err.close()
                if err.code != 429 and err.code < 500:
                    break
            except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
                cause = getattr(err, "reason", err)
                last = f"{type(err).__name__}: {cause}"
                timed_out = isinstance(err, TimeoutError) or isinstance(cause, TimeoutError)
                reason = "timeout" if timed_out else "connection"
        raise self.error(
            f"{name}: POST {self.endpoint} failed ({last}) after {attempt + 1} attempt(s)", reason
        )

    def chat(
        self, messages: list[dict[str, str]], on_retry: Callable[[str], None] | None = None
    ) -> str:
        """The assistant's reply (``choices[0].message.content``) to `messages`."""
        payload = {"model": self.model, "messages": messages, **self.request_options}
        data = self._post(payload, on_retry)
        try:
            content = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise self.error(
                f"{type(self).__name__}: POST {self.endpoint} returned no "
                "choices[0].message.content",
                "bad_response",
            ) from None
        return str(content)


class HttpJudge(ChatClient):
    """LLM judge behind an OpenAI-compatible chat-completions endpoint (:class:`ChatClient`).

    The prompt shows the references (``item["references"]``; optional ``item["prompt"]``) and the two
    candidates labelled A and B; the order is randomized per item with ``random.Random(seed)`` and
    mapped back, so position bias averages out. The model must answer exactly "A", "B" or "tie";
    anything :func:`parse_verdict` cannot read counts as a tie and increments :attr:`n_unparsed`.
    Failed requests raise :class:`HttpJudgeError`.
    """

    name = "http"
    error = HttpJudgeError
    SYSTEM_PROMPT = "You are a careful, impartial judge of image captions."

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 2,
        seed: int = 0,
        backoff: float = 0.5,
        request_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(url, model, api_key_env, timeout, max_retries, backoff, request_options)
        self.seed = seed
        self.n_unparsed = 0
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", seed={self.seed})"

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

    def judge_one(self, output_a: str, output_b: str, item: dict) -> float:
        """Ask the model about one pair; returns 1.0 / 0.5 / 0.0 from A's point of view."""
        swap = self._rng.random() < 0.5
        first, second = (output_b, output_a) if swap else (output_a, output_b)
        content = self.chat(
            [
                {"role": "system", "content": self.SYSTEM_PROMPT},
                {"role": "user", "content": self.build_prompt(first, second, item)},
            ]
        )
        verdict = parse_verdict(content)
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
        check_lengths(outputs_a, outputs_b, items)
        return [self.judge_one(a, b, it) for a, b, it in zip(outputs_a, outputs_b, items)]

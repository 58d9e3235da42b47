"""COCO-style caption metrics (CIDEr-D, BLEU-1..4, METEOR, ROUGE-L) as a ``torchmetrics.Metric``.

Why a Metric that stores *strings*: CIDEr's IDF and BLEU's brevity penalty are corpus-level
statistics, so per-rank scores cannot be averaged under DDP. The captions are therefore kept as
UTF-8 bytes in ``uint8`` list states with ``dist_reduce_fx="cat"``; torchmetrics' sync gathers
them from every rank and :meth:`CaptionMetrics.compute` decodes and scores the whole corpus with
pycocoevalcap's own scorers, exactly as ``COCOEvalCap`` does (PTB tokenization, then each scorer's
``compute_score``).

Scale: every score is multiplied by 100, as on the COCO leaderboard and in papers ("CIDEr 142.6",
"BLEU-4 41.2"), not pycocoevalcap's raw 0..1 (0..10 for CIDEr) numbers.

Tokenization: the Stanford PTB tokenizer shipped with pycocoevalcap (Java). Without Java, a
pure-Python approximation (:func:`python_ptb_tokenize`) is used and METEOR (a Java program) is
reported as NaN; :attr:`CaptionMetrics.last_info` says which tokenizer ran and why METEOR is
missing, so numbers from the two paths are never silently mixed.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = [
    "METRIC_NAMES",
    "CaptionMetrics",
    "close_shared_meteor",
    "coco_caption_scores",
    "decode_nested",
    "decode_strings",
    "encode_nested",
    "encode_strings",
    "java_available",
    "python_ptb_tokenize",
    "resolve_tokenizer",
    "shared_meteor",
    "tokenize_captions",
]

TokenizerName = Literal["ptb", "python"]
METRIC_NAMES: tuple[str, ...] = (
    "cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l",
)  # fmt: skip
SCALE = 100.0


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
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


def _ptb_tokenize(captions: Sequence[str]) -> list[str]:
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
        return _ptb_tokenize(captions), name
    return [python_ptb_tokenize(c) for c in captions], name


# --------------------------------------------------------------------------------------------
# METEOR: one long-lived JVM per process (loading its paraphrase table takes ~20 s)
# --------------------------------------------------------------------------------------------
_METEOR_LOCK = threading.Lock()
_METEOR: dict[str, Any] = {"scorer": None, "pid": None}


def shared_meteor() -> Any:
    """Return this process's pycocoevalcap ``Meteor`` scorer, starting its JVM on first use.

    Why shared: METEOR spends ~20 s loading paraphrase tables at start-up; per-epoch evaluation
    would pay that every time. ``Meteor()`` only spawns the process, so calling this early (the
    metric does it in ``__init__``) lets the JVM warm up in the background. Needs Java.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    with _METEOR_LOCK:
        scorer = _METEOR["scorer"]
        alive = scorer is not None and scorer.meteor_p.poll() is None
        if not alive or _METEOR["pid"] != os.getpid():
            scorer = Meteor()
            _METEOR.update(scorer=scorer, pid=os.getpid())
        return scorer


def close_shared_meteor() -> None:
    """Stop the shared METEOR JVM (also registered with ``atexit``); only the owning process."""
    with _METEOR_LOCK:
        scorer, pid = _METEOR["scorer"], _METEOR["pid"]
        _METEOR.update(scorer=None, pid=None)
    if scorer is not None and pid == os.getpid():
        proc = scorer.meteor_p
        if proc.stdin is not None:
            proc.stdin.close()
        proc.kill()
        proc.wait()


atexit.register(close_shared_meteor)


def coco_caption_scores(
    gts: dict[Any, list[str]], res: dict[Any, list[str]], meteor: Any | None = None
) -> dict[str, float]:
    """Score *tokenized* captions with pycocoevalcap's scorers (raw scale, as ``COCOEvalCap``).

    ``gts``: id -> tokenized references; ``res``: id -> [tokenized prediction]. METEOR is NaN when
    ``meteor`` (a pycocoevalcap ``Meteor``) is None.
    """
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    meteor_score = float(meteor.compute_score(gts, res)[0]) if meteor is not None else math.nan
    return {
        "cider": float(cider),
        "bleu_1": float(bleu[0]),
        "bleu_2": float(bleu[1]),
        "bleu_3": float(bleu[2]),
        "bleu_4": float(bleu[3]),
        "meteor": meteor_score,
        "rouge_l": float(rouge),
    }


# --------------------------------------------------------------------------------------------
# String <-> tensor encoding (so torchmetrics can all-gather strings)
# --------------------------------------------------------------------------------------------
def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def encode_strings(strings: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """Encode strings as a flat ``uint8`` tensor: per string a 4-byte little-endian length + UTF-8.

    The format is closed under concatenation (``cat(enc(a), enc(b)) == enc(a + b)``), which is
    what lets ``dist_reduce_fx="cat"`` gather strings from all ranks.
    """
    buf = bytearray()
    for s in strings:
        data = s.encode("utf-8")
        buf += _u32(len(data)) + data
    return (
        torch.frombuffer(buf, dtype=torch.uint8).clone().to(device)
        if buf
        else torch.zeros(0, dtype=torch.uint8, device=device)
    )


def encode_nested(
    groups: Sequence[Sequence[str]], device: torch.device | str | None = None
) -> Tensor:
    """Encode a list of string lists: per item a 4-byte count, then its strings as above."""
    parts = []
    for items in groups:
        parts.append(torch.tensor(list(_u32(len(items))), dtype=torch.uint8, device=device))
        parts.append(encode_strings(items, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)


def _as_bytes(data: Tensor | bytes) -> bytes:
    if isinstance(data, Tensor):
        return data.detach().to("cpu", torch.uint8).numpy().tobytes()
    return data


def _read_strings(buf: bytes, pos: int, count: int | None) -> tuple[list[str], int]:
    out: list[str] = []
    while pos < len(buf) and (count is None or len(out) < count):
        n = int.from_bytes(buf[pos : pos + 4], "little")
        out.append(buf[pos + 4 : pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    return out, pos


def decode_strings(data: Tensor | bytes) -> list[str]:
    """Inverse of :func:`encode_strings`."""
    return _read_strings(_as_bytes(data), 0, None)[0]


def decode_nested(data: Tensor | bytes) -> list[list[str]]:
    """Inverse of :func:`encode_nested`."""
    buf, pos, out = _as_bytes(data), 0, []
    while pos < len(buf):
        count = int.from_bytes(buf[pos : pos + 4], "little")
        items, pos = _read_strings(buf, pos + 4, count)
        out.append(items)
    return out


# --------------------------------------------------------------------------------------------
# The Metric
# --------------------------------------------------------------------------------------------
class CaptionMetrics(Metric):
    """Corpus-level COCO caption metrics, DDP-safe, with optional per-group breakdown.

    Args:
        tokenizer: ``"auto"`` (PTB if Java is available, else the Python fallback), ``"ptb"`` or
            ``"python"``.
        meteor: compute METEOR (needs Java, ~20 s JVM start-up once per process; the JVM is started
            in ``__init__`` so it warms up while you train). ``False`` reports NaN.

    ``update(predictions, references, groups=None)`` takes one prediction and >= 1 reference per
    item and an optional group label per item (e.g. NoCaps ``in-domain``/``near-domain``/
    ``out-domain``). ``compute()`` returns ``{"cider", "bleu_1".."bleu_4", "meteor", "rouge_l"}``
    over all items, ×100 (COCO-leaderboard scale), plus ``"{metric}/{group}"`` for every group,
    each scored on that subset alone (CIDEr's IDF comes from the subset, like NoCaps' per-domain
    evaluation). Information about how the numbers were made (tokenizer, METEOR status, item
    counts) is stored in :attr:`last_info` after each ``compute()`` so the return value stays a
    flat ``dict[str, float]`` for ``log_dict``.

    Scoring runs Java programs, so call ``update`` per batch and ``compute`` once per epoch;
    ``forward`` (``metric(...)``) therefore only updates and returns None. Under DDP every rank
    gathers all strings and computes the same result. With a ``DistributedSampler`` that pads the
    last batch, the padded duplicates are scored too (as with any gathered metric).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STRING_STATES = ("pred_bytes", "ref_bytes", "group_bytes")

    def __init__(self, tokenizer: str = "auto", meteor: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tokenizer not in ("auto", "ptb", "python"):
            raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.meteor = meteor
        self.last_info: dict[str, Any] = {}
        for name in self._STRING_STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        if meteor and java_available():
            with contextlib.suppress(OSError):  # a failure is reported at compute time
                shared_meteor()  # non-blocking: only spawns the JVM

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str] | str],
        groups: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: ``predictions[i]`` is scored against ``references[i]`` (group ``groups[i]``)."""
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings, not a single string")
        if len(predictions) != len(references):
            raise ValueError(
                f"got {len(predictions)} predictions but {len(references)} reference lists"
            )
        if groups is not None and len(groups) != len(predictions):
            raise ValueError(f"got {len(groups)} groups for {len(predictions)} predictions")
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        for i, r in enumerate(refs):
            if not r or not all(isinstance(x, str) for x in r):
                raise ValueError(f"item {i}: references must be a non-empty list of strings")
        if not predictions:
            return
        self.pred_bytes.append(encode_strings([str(p) for p in predictions], self.device))
        self.ref_bytes.append(encode_nested(refs, self.device))
        grp = [""] * len(predictions) if groups is None else [str(g) for g in groups]
        self.group_bytes.append(encode_strings(grp, self.device))

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate only; per-batch caption scores would start a JVM every step."""
        self.update(*args, **kwargs)

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        # torchmetrics replaces an empty list state by an empty *float* tensor before gathering;
        # a rank without data would then send float32 while the others send uint8. Use uint8.
        for name in self._STRING_STATES:
            if not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=torch.uint8, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _decoded(self) -> tuple[list[str], list[list[str]], list[str]]:
        def flat(state: list[Tensor] | Tensor) -> Tensor:
            if isinstance(state, list):
                if not state:
                    return torch.zeros(0, dtype=torch.uint8)
                state = dim_zero_cat([s.to(torch.uint8) for s in state])
            return state

        preds = decode_strings(flat(self.pred_bytes))
        refs = decode_nested(flat(self.ref_bytes))
        groups = decode_strings(flat(self.group_bytes))
        if not (len(preds) == len(refs) == len(groups)):
            raise RuntimeError(
                f"corrupt CaptionMetrics state: {len(preds)} predictions, {len(refs)} reference "
                f"lists, {len(groups)} groups"
            )
        return preds, refs, groups

    def compute(self) -> dict[str, float]:
        """Score everything seen so far (all ranks); see the class docstring for keys and scale."""
        preds, refs, groups = self._decoded()
        if not preds:
            raise ValueError(
                "CaptionMetrics.compute() has no data: call update(predictions, references) first"
            )
        flat_refs = [r for rs in refs for r in rs]
        tokens, tok_name = tokenize_captions(preds + flat_refs, self.tokenizer)
        res = {i: [tokens[i]] for i in range(len(preds))}
        gts: dict[int, list[str]] = {}
        pos = len(preds)
        for i, rs in enumerate(refs):
            gts[i] = tokens[pos : pos + len(rs)]
            pos += len(rs)

        meteor_scorer, meteor_status = None, "ok"
        if not self.meteor:
            meteor_status = "disabled (meteor=False)"
        elif not java_available():
            meteor_status = "unavailable: METEOR is a Java program and `java` is not on PATH"
        else:
            try:
                meteor_scorer = shared_meteor()
            except OSError as err:
                meteor_status = f"unavailable: could not start METEOR ({err})"

        def score(ids: list[int]) -> dict[str, float]:
            nonlocal meteor_scorer, meteor_status
            sub_gts = {i: gts[i] for i in ids}
            sub_res = {i: res[i] for i in ids}
            try:
                out = coco_caption_scores(sub_gts, sub_res, meteor_scorer)
            except (OSError, ValueError) as err:
                if meteor_scorer is None:
                    raise
                close_shared_meteor()  # broken JVM: drop it, report NaN, keep the other metrics
                meteor_scorer, meteor_status = None, f"failed: {type(err).__name__}: {err}"
                out = coco_caption_scores(sub_gts, sub_res, None)
            return {k: v * SCALE for k, v in out.items()}

        result = score(list(range(len(preds))))
        group_names = sorted({g for g in groups if g})
        group_sizes: dict[str, int] = {}
        for g in group_names:
            ids = [i for i, gi in enumerate(groups) if gi == g]
            group_sizes[g] = len(ids)
            result.update({f"{k}/{g}": v for k, v in score(ids).items()})
        self.last_info = {
            "tokenizer": tok_name,
            "meteor": meteor_status,
            "scale": SCALE,
            "n_items": len(preds),
            "n_references": len(flat_refs),
            "groups": group_sizes,
        }
        return result

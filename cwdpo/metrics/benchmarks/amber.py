"""AMBER (Wang et al. 2023): discriminative yes/no and generative object hallucination.

Files (the AMBER repository's `data/`): `annotations.json` (rows `{id, type, truth[, hallu]}`),
the query files `query/query_*.json` (rows `{id, image, query}`; any subset: generative ids
1–1004, discriminative ≥ 1005), and for the generative task `relation.json` ({object: [words
associated with it]}) and `safe_words.txt`. Images: `images_dir/<image>`. With `path=` (a
clone of the AMBER repository with the images unpacked into `images/`) every file defaults to
its place there: `data/annotations.json`, `data/query/query_all.json` (both tasks),
`data/relation.json`, `data/safe_words.txt`, `images/`.

**Discriminative** (as `inference.py` scores it): the official scorer compares the response with
exactly "Yes" / "No"; a free-form answer is first reduced to that by `answer_rule`:
"yes_word" (default; what the community AMBER inference scripts write before scoring: the word
"yes" anywhere, case-insensitive → "Yes", else "No") or "exact" (the stripped answer must be
"Yes" or "No"; anything else — "No." included — is neither, so it is wrong whatever the truth
and is no predicted "no", as in `inference.py`; counted in `discriminative/unread`). "No" is the
positive class: precision = right "No"s / predicted "No"s, recall = right "No"s / true "no"s;
F1 = 2PR/(P+R) unrounded (inference.py rounds P and R to 0.1 first and adds 1e-4 to the
denominator: < 0.05 points apart); a metric whose denominator is 0 is 0.0 (inference.py would
divide by zero). Reported overall and per dimension (existence, attribute, relation).

**Generative**: nouns of the response that are in the relation vocabulary (keys and values of
`relation.json`) are checked against the image's `truth` and `hallu` objects and their
associated words, exactly by inference.py's rules (global safe words are skipped but counted,
the first matching word decides, Cover marks a truth object, Cog a hallu object). CHAIR =
hallucinated nouns / nouns, Cover = truth objects mentioned / truth objects, Hal = responses with
≥ 1 hallucinated noun, Cog = hallu objects mentioned / hallu objects, all in percent; AMBER
score = (100 − CHAIR + F1) / 2 when both tasks are scored.
The official near-synonym step (spaCy `en_core_web_lg` word vectors, similarity > 0.8) needs
`pip install spacy && python -m spacy download en_core_web_lg` (`similarity="spacy"`, the
default; a clear error before generation when missing). `similarity="exact"` scores without it:
only exact matches, so CHAIR and Hal can only be higher and Cover and Cog lower than the
official numbers — not comparable with published tables. Nouns are found with
`words.singularize` on every token instead of NLTK's POS tagger + WordNet lemmatizer (see
words.py for the difference). As in the official scorer (its tokens keep their case and the
vocabulary is lowercase), a capitalized word ("Trees" opening a sentence) is not counted unless
`lowercase=True`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cwdpo.data.records import ImageRef
from cwdpo.errors import DataError
from cwdpo.metrics.benchmarks.base import BenchItem, Benchmark, require_answers
from cwdpo.metrics.benchmarks.layout import local_file, read_json, row_field
from cwdpo.metrics.benchmarks.words import singularize, tokenize

GENERATIVE = "generative"
DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
    "discriminative-relation": "relation",
}
ANSWER_RULES = ("yes_word", "exact")
_YES = re.compile(r"\byes\b", re.IGNORECASE)

Similarity = Callable[[str, str], float]


def read_yes_no(text: str, rule: str = "yes_word") -> str | None:
    """ "Yes", "No" or None (unread) for a discriminative answer under `rule`."""
    if rule == "exact":
        stripped = text.strip()
        return stripped if stripped in ("Yes", "No") else None
    if rule == "yes_word":
        return "Yes" if _YES.search(text) else "No"
    raise ValueError(f"amber: answer_rule must be one of {ANSWER_RULES}, got {rule!r}")


def require_spacy(model: str = "en_core_web_lg") -> None:
    """spaCy and its `model` installed (looked up, not loaded), else the clear message."""
    if importlib.util.find_spec("spacy") is None or importlib.util.find_spec(model) is None:
        raise RuntimeError(
            f"amber: the official generative scorer compares words with spaCy's {model!r} "
            f"word vectors, which are not installed: pip install spacy && python -m spacy "
            f"download {model}; or set similarity=exact (exact matches only: not comparable "
            "with published AMBER numbers)"
        )


def spacy_similarity(model: str = "en_core_web_lg") -> Similarity:
    """The official near-synonym test's similarity: spaCy Doc vectors' cosine, docs cached."""
    require_spacy(model)
    import spacy

    nlp = spacy.load(model)
    docs: dict[str, Any] = {}

    def similarity(a: str, b: str) -> float:
        for w in (a, b):
            if w not in docs:
                docs[w] = nlp(w)
        return float(docs[a].similarity(docs[b]))

    return similarity


_load_json = partial(read_json, "amber")
_field = partial(row_field, "amber")


def _expand(objects: Sequence[str], relation: Mapping[str, list[str]]) -> tuple[list, list]:
    """inference.py's word list for a set of objects: every associated word, then the objects
    themselves, each with the index of the object it belongs to."""
    words = [w for o in objects for w in relation[o]] + list(objects)
    owner = [k for k, o in enumerate(objects) for _ in relation[o]] + list(range(len(objects)))
    return words, owner


def _first(noun: str, words: list[str], sim: Similarity | None, threshold: float) -> int | None:
    if sim is None:
        return None
    return next((j for j, w in enumerate(words) if sim(noun, w) > threshold), None)


class AmberBenchmark(Benchmark):
    """AMBER's discriminative and generative tasks over the given query files."""

    name = "amber"
    file_keys = ("annotations", "queries", "images_dir")

    def __init__(
        self,
        path: str | None = None,
        annotations: str | None = None,
        queries: str | Sequence[str] | None = None,
        images_dir: str | None = None,
        relation: str | None = None,
        safe_words: str | None = None,
        answer_rule: str = "yes_word",
        similarity: str = "spacy",
        spacy_model: str = "en_core_web_lg",
        similarity_threshold: float = 0.8,
        lowercase: bool = False,
        max_new_tokens: int = 512,
    ) -> None:
        if answer_rule not in ANSWER_RULES:
            raise ValueError(
                f"amber: answer_rule must be one of {ANSWER_RULES}, got {answer_rule!r}"
            )
        if similarity not in ("spacy", "exact"):
            raise ValueError(f"amber: similarity must be 'spacy' or 'exact', got {similarity!r}")
        self.annotations = local_file(
            "amber", "annotations", annotations, path, "data/annotations.json"
        )
        self.images_dir = local_file("amber", "images_dir", images_dir, path, "images")
        if queries is None or isinstance(queries, str):
            queries = [local_file("amber", "queries", queries, path, "data/query/query_all.json")]
        self.queries = list(queries)
        self.relation_file = relation or (path and str(Path(path) / "data/relation.json"))
        self.safe_words_file = safe_words or (path and str(Path(path) / "data/safe_words.txt"))
        self.answer_rule, self.similarity, self.spacy_model = answer_rule, similarity, spacy_model
        self.threshold, self.lowercase = similarity_threshold, lowercase
        self.max_new_tokens = max_new_tokens
        self.relation: dict[str, list[str]] = {}
        self.vocabulary: set[str] = set()
        self.safe: set[str] = set()
        self._sim: Similarity | None = None

    def check(self) -> None:
        """The files exist and, when a generative query is asked with `similarity="spacy"`,
        spaCy's word vectors are installed — before any model loads (the query and annotation
        files are small; the images are checked by `read`)."""
        for what, path in (("annotations", self.annotations), ("images_dir", self.images_dir)):
            if not Path(path).exists():
                raise DataError(f"amber: {what} not found: {path}")
        if self.similarity != "spacy":
            return
        rows = self._annotation_rows()
        for qfile in self.queries:
            for q in _load_json(qfile, "query", list):
                row = rows.get(q.get("id") if isinstance(q, dict) else None)
                if row is not None and row["type"] == GENERATIVE:
                    require_spacy(self.spacy_model)
                    return

    def protocol_note(self) -> str:
        if self.similarity == "exact":
            return "similarity=exact: no word-vector step, not comparable to published AMBER"
        return ""

    # ------------------------------------------------------------------------------ reading
    def _annotation_rows(self) -> dict[int, dict]:
        rows = {}
        for i, row in enumerate(_load_json(self.annotations, "annotations", list)):
            where = f"{self.annotations}: row {i}"
            kind = _field(row, "type", where, str)
            if kind != GENERATIVE and kind not in DIMENSIONS:
                raise DataError(
                    f"amber: {where}: type {kind!r} is not 'generative' or one of {sorted(DIMENSIONS)}"
                )
            if kind == GENERATIVE:
                _field(row, "truth", where, list)
                _field(row, "hallu", where, list)
            elif row.get("truth") not in ("yes", "no"):
                raise DataError(
                    f"amber: {where}: field 'truth' is {row.get('truth')!r}; expected 'yes' or 'no'"
                )
            row_id = _field(row, "id", where, int)
            if row_id in rows:
                raise DataError(f"amber: {where}: id {row_id} appears twice in the annotations")
            rows[row_id] = row
        return rows

    def _load_generative_files(self) -> None:
        if not self.relation_file or not self.safe_words_file:
            raise DataError("amber: generative queries need relation= and safe_words= files")
        relation = _load_json(self.relation_file, "relation", dict)
        for key, words in relation.items():
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise DataError(
                    f"amber: {self.relation_file}: entry {key!r} must be a list of words"
                )
        self.relation = relation
        self.vocabulary = set(relation) | {w for ws in relation.values() for w in ws}
        path = Path(self.safe_words_file)
        if not path.is_file():
            raise DataError(f"amber: safe_words file not found: {path}")
        self.safe = {line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()}
        if self.similarity == "spacy" and self._sim is None:
            self._sim = spacy_similarity(self.spacy_model)

    def _check_objects(self, row: dict, where: str) -> None:
        for key in ("truth", "hallu"):
            for word in row[key]:
                if word not in self.relation:
                    raise DataError(
                        f"amber: {where}: {key} object {word!r} is not a key of {self.relation_file}"
                    )

    def read(self) -> list[BenchItem]:
        rows = self._annotation_rows()
        items: list[BenchItem] = []
        seen: set[int] = set()
        for qfile in self.queries:
            for i, q in enumerate(_load_json(qfile, "query", list)):
                where = f"{qfile}: row {i}"
                qid = _field(q, "id", where, int)
                image, prompt = _field(q, "image", where, str), _field(q, "query", where, str)
                if qid in seen:
                    raise DataError(f"amber: {where}: id {qid} appears twice in the query files")
                if qid not in rows:
                    raise DataError(f"amber: {where}: id {qid} has no row in {self.annotations}")
                seen.add(qid)
                path = Path(self.images_dir) / image
                if not path.is_file():
                    raise DataError(f"amber: {where}: image file not found: {path}")
                row = rows[qid]
                meta = {"type": row["type"], "truth": row["truth"]}
                # `limit=N` (runner) / `n_items` (callback): the first N of each task
                meta["split"] = "generative" if row["type"] == GENERATIVE else "discriminative"
                if row["type"] == GENERATIVE:
                    meta["hallu"] = row["hallu"]
                items.append(
                    BenchItem(str(qid), [ImageRef(path=str(path), name=image)], prompt, meta)
                )
        if any(it.meta["type"] == GENERATIVE for it in items):
            self._load_generative_files()
            for it in items:
                if it.meta["type"] == GENERATIVE:
                    self._check_objects(rows[int(it.id)], f"{self.annotations}: id {it.id}")
        return items

    # ------------------------------------------------------------------------------ scoring
    def nouns(self, text: str) -> list[str]:
        """The response's words in the relation vocabulary (the official noun extraction's role)."""
        tokens = tokenize(text.lower() if self.lowercase else text)
        return [w for w in (singularize(t) for t in tokens) if w in self.vocabulary]

    def judge_description(self, text: str, truth: list[str], hallu: list[str]) -> dict[str, Any]:
        """inference.py's verdict on one description: per-noun hallucination flags and which
        truth (Cover) and hallu (Cog) objects it mentions."""
        safe_words, safe_owner = _expand(truth, self.relation)
        ha_words, ha_owner = _expand(hallu, self.relation)
        covered, cog, flags = [False] * len(truth), [False] * len(hallu), []
        for noun in self.nouns(text):
            if noun in self.safe:
                flags.append(False)
                continue
            if noun in safe_words:
                covered[safe_owner[safe_words.index(noun)]] = True
                flags.append(False)
                continue
            if noun in ha_words:
                cog[ha_owner[ha_words.index(noun)]] = True
            if (j := _first(noun, ha_words, self._sim, self.threshold)) is not None:
                cog[ha_owner[j]] = True
            if (j := _first(noun, safe_words, self._sim, self.threshold)) is not None:
                covered[safe_owner[j]] = True
                flags.append(False)
                continue
            flags.append(True)
        return {"flags": flags, "covered": covered, "cog": cog}

    def _generative(self, items: Sequence[BenchItem], texts: Sequence[str]) -> dict[str, float]:
        n = hallucinated = mentions = cover = n_truth = cog = n_hallu = with_hal = 0
        for item, text in zip(items, texts):
            v = self.judge_description(text, item.meta["truth"], item.meta["hallu"])
            n += 1
            hallucinated += sum(v["flags"])
            mentions += len(v["flags"])
            with_hal += any(v["flags"])
            cover, n_truth = cover + sum(v["covered"]), n_truth + len(v["covered"])
            cog, n_hallu = cog + sum(v["cog"]), n_hallu + len(v["cog"])
        return {
            "amber/generative/chair": _pct(hallucinated, mentions),
            "amber/generative/cover": _pct(cover, n_truth),
            "amber/generative/hal": _pct(with_hal, n),
            "amber/generative/cog": _pct(cog, n_hallu),
        }

    def _discriminative(self, items: Sequence[BenchItem], texts: Sequence[str]) -> dict[str, float]:
        preds = [read_yes_no(t, self.answer_rule) for t in texts]
        truths = [it.meta["truth"] for it in items]
        out = _yes_no_metrics("amber/discriminative", preds, truths)
        out["amber/discriminative/unread"] = float(sum(p is None for p in preds))
        for dim in ("existence", "attribute", "relation"):
            keep = [k for k, it in enumerate(items) if DIMENSIONS[it.meta["type"]] == dim]
            if keep:
                sub = _yes_no_metrics(
                    f"amber/{dim}", [preds[k] for k in keep], [truths[k] for k in keep]
                )
                out.update(sub)
        return out

    def score(self, items: Sequence[BenchItem], answers: Mapping[str, str]) -> dict[str, float]:
        if not items:
            raise ValueError("amber: no items to score")
        texts = require_answers(self.name, items, answers)
        gen = [k for k, it in enumerate(items) if it.meta["type"] == GENERATIVE]
        dis = [k for k, it in enumerate(items) if it.meta["type"] != GENERATIVE]
        out: dict[str, float] = {}
        if gen:
            if not self.relation:
                self._load_generative_files()
            out.update(self._generative([items[k] for k in gen], [texts[k] for k in gen]))
        if dis:
            out.update(self._discriminative([items[k] for k in dis], [texts[k] for k in dis]))
        if gen and dis:
            out["amber/amber_score"] = (
                100.0 - out["amber/generative/chair"] + out["amber/discriminative/f1"]
            ) / 2
        return out


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def _yes_no_metrics(prefix: str, preds: Sequence[str | None], truths: Sequence[str]) -> dict:
    """inference.py's counts: "No" is the positive class; an unread answer is never right."""
    right = sum(
        (p == "Yes" and t == "yes") or (p == "No" and t == "no") for p, t in zip(preds, truths)
    )
    true_no = sum(p == "No" and t == "no" for p, t in zip(preds, truths))
    precision = _pct(true_no, sum(p == "No" for p in preds))
    recall = _pct(true_no, sum(t == "no" for t in truths))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        f"{prefix}/accuracy": _pct(right, len(preds)),
        f"{prefix}/precision": precision,
        f"{prefix}/recall": recall,
        f"{prefix}/f1": f1,
    }

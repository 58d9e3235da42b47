"""The embedded tiny VLM: a real LLaVA loaded through the Auto* classes, cached, with a tokenizer
made for ShapesWorld."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from cwdpo.data import shapes as S
from cwdpo.model import tiny
from cwdpo.model.tiny import TinySpec, ensure_tiny_vlm

SPEC = TinySpec()


@pytest.fixture(scope="module")
def loaded(tiny_vlm_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path)
    processor = AutoProcessor.from_pretrained(tiny_vlm_path)
    return model, processor


def test_built_model_is_llava_through_auto_classes(loaded, tiny_vlm_path):
    model, processor = loaded
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.vision_config.image_size == SPEC.image_size
    assert model.config.vision_config.patch_size == SPEC.patch_size
    assert model.config.text_config.num_hidden_layers == SPEC.text_layers
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000  # tiny: CPU tests stay fast
    spec = json.loads((tiny_vlm_path / "cwdpo_tiny_spec.json").read_text())
    assert spec == {**SPEC.__dict__}


def test_chat_template_has_image_token_and_expands_to_patch_grid(loaded):
    model, processor = loaded
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": S.PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<image>" in text and S.PROMPT in text and text.endswith("<|assistant|>")
    img = S.Scene([S.Obj("red", "circle", "large", "left")], seed=0).render()
    enc = processor(images=[img], text=[text], return_tensors="pt")
    image_id = model.config.image_token_id
    assert image_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    n_img = int((enc["input_ids"] == image_id).sum())
    assert n_img == (SPEC.image_size // SPEC.patch_size) ** 2
    assert enc["pixel_values"].shape == (1, 3, SPEC.image_size, SPEC.image_size)
    # the model accepts it and returns next-token logits over the whole vocabulary
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(out.logits).all()


def test_image_changes_the_logits(loaded):
    """The vision tower is wired in: two different images give different next-token logits."""
    model, processor = loaded
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": S.PROMPT}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    imgs = [
        S.Scene([S.Obj("red", "circle", "large", "left")], seed=0, noise=0).render(),
        S.Scene([S.Obj("blue", "square", "small", "right")], seed=0, noise=0).render(),
    ]
    enc = processor(images=imgs, text=[text, text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_cache_is_reused_without_rebuilding(tiny_cache_dir, tiny_vlm_path, monkeypatch):
    weights = next(tiny_vlm_path.glob("*.safetensors"))
    before = (
        weights.stat().st_mtime_ns,
        (tiny_vlm_path / "cwdpo_tiny_spec.json").stat().st_mtime_ns,
    )

    def boom(*a, **k):
        raise AssertionError("ensure_tiny_vlm rebuilt a cached model")

    monkeypatch.setattr(tiny, "build_tiny_vlm", boom)
    again = ensure_tiny_vlm(tiny_cache_dir)
    assert again == tiny_vlm_path
    after = (
        weights.stat().st_mtime_ns,
        (tiny_vlm_path / "cwdpo_tiny_spec.json").stat().st_mtime_ns,
    )
    assert after == before
    # no temp dirs left behind by the atomic build (other tests may share this cache dir)
    assert not [p.name for p in tiny_cache_dir.iterdir() if ".tmp" in p.name]


def test_cache_key_depends_on_every_spec_field():
    base = TinySpec()
    assert TinySpec().key() == base.key()
    keys = {base.key()}
    for field in ("image_size", "text_layers", "vocab_size", "seed", "version"):
        keys.add(TinySpec(**{**base.__dict__, field: getattr(base, field) + 1}).key())
    assert len(keys) == 6


def test_ensure_honours_cwdpo_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CWDPO_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path
    # don't build (5 s): a pre-existing spec file marks the cache entry as complete
    target = tmp_path / f"tiny-llava-{SPEC.key()}"
    target.mkdir()
    (target / "cwdpo_tiny_spec.json").write_text("{}")
    monkeypatch.setattr(tiny, "build_tiny_vlm", lambda *a, **k: pytest.fail("rebuilt"))
    assert ensure_tiny_vlm() == target


def _captions_and_negatives():
    world = S.ShapesWorld(S.WorldConfig(min_objects=1, max_objects=4), seed=21)
    texts = []
    for p in world.pairs("train", 200, easy_fraction=0.5):
        texts += [p.chosen, p.rejected, *p.meta["references"]]
    return texts


def test_tokenizer_round_trips_shapes_text_exactly(loaded):
    tok = loaded[1].tokenizer
    texts = _captions_and_negatives() + [S.PROMPT, "Un café près du pont 🐶"]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
    assert tok.unk_token_id not in tok(" ".join(texts), add_special_tokens=False)["input_ids"]


def test_caption_words_are_single_tokens(loaded):
    """Every word a reference caption uses is one token in context (" word" after a space, or
    the bare word at the start), so sequence length = number of words (+ eos)."""
    tok = loaded[1].tokenizer
    world = S.ShapesWorld(S.WorldConfig(min_objects=1, max_objects=4), seed=3)
    for rec in world.captions("train", 100):
        for ref in rec.references:
            n = len(tok(ref, add_special_tokens=False)["input_ids"])
            assert n == len(ref.split()), ref


def test_every_shapes_vocabulary_word_is_at_most_two_tokens(loaded):
    """The docstring promises "ShapesWorld words become single tokens". In context a word follows
    a space (" word"): that form must be ≤ 2 tokens (3 for the hyphenated "purple-ish"); the bare
    form (first word of a text) ≤ 3. At the default vocab_size=400 the BPE runs out of merges and
    " five" (count hard negatives) is 4 tokens, " zero" 4, " mountain" 8; vocab_size=512 (the BPE
    saturates at ~498) passes."""
    tok = loaded[1].tokenizer
    too_long = {}
    for w in S.vocabulary():
        spaced = len(tok(" " + w, add_special_tokens=False)["input_ids"])
        bare = len(tok(w, add_special_tokens=False)["input_ids"])
        if spaced > (3 if "-" in w else 2) or bare > 3:
            too_long[w] = (bare, spaced)
    assert not too_long, too_long


def test_special_tokens(loaded):
    tok = loaded[1].tokenizer
    for t in tiny.SPECIAL_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"
    assert tok.pad_token_id != tok.eos_token_id


def test_the_llava_family_is_the_default_tiny_vlm(loaded, tiny_vlm_path, tmp_path):
    """The registered `llava` builder builds (it used to only raise): the same weights and
    tokenizer as the embedded tiny VLM, and `ensure_family` hands out that cached directory."""
    from cwdpo.model.families import FAMILIES, build_family, ensure_family

    assert ensure_family("llava", tiny_vlm_path.parent) == tiny_vlm_path
    out = build_family("llava", tmp_path / "llava")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert (
        type(model) is type(loaded[0]) and model.config.model_type == FAMILIES["llava"].model_type
    )
    ref = loaded[0].state_dict()
    assert model.state_dict().keys() == ref.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert (
        AutoProcessor.from_pretrained(out).tokenizer.get_vocab() == loaded[1].tokenizer.get_vocab()
    )

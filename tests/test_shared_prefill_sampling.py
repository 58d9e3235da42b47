"""The shared-prefill sampler (cwdpo.model.sampling) against the plain path, on every family.

K samples per record with image + prompt prefilled once must be the plain path's K samples:
(a) the first-token logits equal the plain `generate(num_return_sequences=K)`'s; (b) a
teacher-forced continuation through the expanded cache has the logits of one full forward of
prompt + continuation (no cache, no padding); (c) greedy rows give identical text; (d) sampled
rows are K draws per record from the nucleus, the same draws as the plain path under one seed;
and the vision tower and the prompt prefill run once per record, not K times.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cwdpo.batch import IGNORE_INDEX
from cwdpo.model.loading import VISION_MODULES
from cwdpo.model.sampling import shared_prefill_generate
from tests import test_families as families

#: the family matrix's fixtures (one tiny build per family per session) and loader, reused
fam, family_dirs, rows, load = families.fam, families.family_dirs, families.rows, families.load

pytestmark = pytest.mark.families  # every family: `make test-fast` skips them

K = 3
#: fp32 logits, cached vs full-width computation (≤ 4e-6 measured on every family, |logits| ≤ 6)
ATOL = 2e-5


def generate(bb, enc, shared: bool, k: int = K, **kw):
    """One generate call on `enc`, shared prefill or plain expansion, logits returned. HF's
    plain path refuses greedy with k > 1: there, call it with k = 1 (row r of the shared
    path is then record r // k of the plain path)."""
    kw = {
        "max_new_tokens": 3,
        "do_sample": False,
        "pad_token_id": bb.tokenizer.pad_token_id,
        "eos_token_id": bb.stop_token_ids,
        "use_cache": True,
        "output_logits": True,
        "return_dict_in_generate": True,
        **kw,
    }
    with torch.no_grad():
        if shared:
            return shared_prefill_generate(bb.model, enc, k, **kw)
        return bb.model.generate(**enc, num_return_sequences=k, **kw)


def test_first_token_logits_equal_the_plain_path(fam, rows):
    name, path = fam
    bb = load(path, trained=True)
    images, prompts, _, _ = rows
    enc = bb.generation_inputs(images, prompts)  # 3 prompts of different lengths: left padding
    plain, shared = generate(bb, enc, False, k=1), generate(bb, enc, True)
    assert shared.sequences.shape == (3 * K, plain.sequences.shape[1])
    assert torch.equal(shared.sequences, plain.sequences.repeat_interleave(K, 0))
    d = (shared.logits[0] - plain.logits[0].repeat_interleave(K, 0)).abs().max().item()
    assert d < ATOL, f"{name}: first-token logits differ by {d:.2e}"
    for r in range(3):  # K identical rows per record, row-major
        assert torch.equal(shared.logits[0][r * K], shared.logits[0][r * K + K - 1])


class ForceTokens(LogitsProcessor):
    """Teacher forcing inside `generate`: row r's t-th new token is conts[r][t]."""

    def __init__(self, conts: list[list[int]], prompt_len: int) -> None:
        self.conts, self.prompt_len = conts, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        out = torch.full_like(scores, float("-inf"))
        for r, c in enumerate(self.conts):
            out[r, c[min(t, len(c) - 1)]] = 0.0
        return out


def test_teacher_forced_continuation_equals_a_full_forward(fam, rows):
    """Each record's response (+ turn end) forced through the expanded cache: its logits at
    every step equal one full forward of prompt + response (`collate`, one row, no cache)."""
    name, path = fam
    bb = load(path, trained=True)
    images, prompts, chosen, _ = rows
    images, prompts, chosen = images[:2], prompts[:2], chosen[:2]
    enc = bb.generation_inputs(images, prompts)
    conts = [bb.response_ids(c) for c in chosen]
    width = enc["input_ids"].shape[1]
    steps = max(len(c) for c in conts)
    worst = 0.0
    for shared in (True, False):  # the plain path too: the forcing harness itself is right
        k = K if shared else 1
        force = LogitsProcessorList([ForceTokens([c for c in conts for _ in range(k)], width)])
        out = generate(bb, enc, shared, k=k, max_new_tokens=steps, logits_processor=force)
        for i, (im, p, c) in enumerate(zip(images, prompts, chosen)):
            batch = bb.collate([im], [p], [c])
            with torch.no_grad():
                full = bb.model(**batch).logits[0]
            lab = batch["labels"][0]
            plen = int((lab == IGNORE_INDEX).long().cumprod(0).sum())
            ref = full[plen - 1 : plen - 1 + len(conts[i])]
            assert lab[plen:].tolist() == conts[i]
            for j in range(k):
                row = i * k + j
                assert out.sequences[row, width : width + len(conts[i])].tolist() == conts[i]
                got = torch.stack([out.logits[t][row] for t in range(len(conts[i]))])
                worst = max(worst, (got - ref).abs().max().item())
        assert worst < ATOL, f"{name} (shared={shared}): |Δ logits| {worst:.2e} vs full forward"


def test_greedy_rows_give_the_plain_paths_text(fam, rows):
    name, path = fam
    bb = load(path, trained=True)
    images, prompts, _, _ = rows
    shared = bb.generate(images, prompts, max_new_tokens=5, num_return_sequences=K)
    plain = bb.generate(images, prompts, max_new_tokens=5)  # HF: greedy only with K = 1
    assert len(shared) == 3 * K and shared == [t for t in plain for _ in range(K)], name


def test_sampled_rows_are_k_draws_from_the_nucleus(fam, rows):
    """Every row's first token lies in the top-p nucleus of its record's first-token
    distribution; the K rows of a record are separate draws (they differ); one seed gives the
    plain path's draws."""
    name, path = fam
    bb = load(path, trained=True)
    images, prompts, _, _ = rows
    enc = bb.generation_inputs(images, prompts)
    kw = {"do_sample": True, "temperature": 2.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 4}
    torch.manual_seed(0)
    shared = generate(bb, enc, True, k=4, **kw)
    torch.manual_seed(0)
    plain = generate(bb, enc, False, k=4, **kw)
    width = enc["input_ids"].shape[1]
    seq = shared.sequences
    assert seq.shape[0] == 3 * 4
    probs = torch.softmax(shared.logits[0] / 2.0, -1)
    for r in range(seq.shape[0]):
        tok = int(seq[r, width])
        above = probs[r][probs[r] > probs[r, tok]].sum().item()
        assert above < 0.9, f"{name} row {r}: token {tok} outside the top-p nucleus"
    new = seq[:, width:].view(3, 4, -1)
    assert any(len({tuple(x.tolist()) for x in rec}) > 1 for rec in new), name
    assert torch.equal(seq, plain.sequences), f"{name}: same seed, different draws"


def _vision_module(model: torch.nn.Module) -> torch.nn.Module:
    named = [(n, m) for n, m in model.named_modules() if VISION_MODULES.search(n)]
    return min(named, key=lambda nm: nm[0].count("."))[1]  # the tower itself, not its layers


def test_vision_tower_and_prompt_prefill_run_once_per_record(fam, rows):
    """Vision inputs seen by the tower: those of B records (as with K = 1), not K·B; tokens
    through the input embedding: B prompts once, then K·B rows × the generated steps."""
    name, path = fam
    bb = load(path)
    images, prompts, _, _ = rows
    seen: list[int] = []
    embedded = [0]

    def tower(mod, args, kwargs, out):
        x = next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v))
        seen.append(x.shape[0])

    def embed(mod, args, out):
        embedded[0] += args[0].numel()

    _vision_module(bb.model).register_forward_hook(tower, with_kwargs=True)
    bb.model.get_input_embeddings().register_forward_hook(embed)
    enc = bb.generation_inputs(images, prompts)
    generate(bb, enc, False, k=1)
    once, seen[:] = list(seen), []
    embedded[0] = 0
    out = generate(bb, enc, True)
    assert once and seen == once, f"{name}: vision inputs {seen} with K={K}, {once} with K=1"
    b, width = enc["input_ids"].shape
    steps = out.sequences.shape[1] - width
    assert embedded[0] == b * width + b * K * steps, (name, embedded[0], b, width, steps)


def test_shared_prefill_rejects_what_it_cannot_do(backbone, pair_batch):
    enc = backbone.generation_inputs(pair_batch.images[:1], pair_batch.prompts[:1])
    with pytest.raises(ValueError, match="num_beams"):
        shared_prefill_generate(backbone.model, enc, 2, num_beams=2)
    with pytest.raises(ValueError, match="use_cache"):
        shared_prefill_generate(backbone.model, enc, 2, use_cache=False)
    with pytest.raises(ValueError, match=">= 1"):
        shared_prefill_generate(backbone.model, enc, 0)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_lora_policy_samples_through_the_shared_prefill(name, rows, family_dirs, tiny_cache_dir):
    """A LoRA policy (peft wraps the model; Qwen's rope_deltas sit one level deeper) with
    trained adapters: greedy rows equal the plain path's, the adapters in use."""
    from tests.conftest import perturb_

    bb = load(families.family_path(name, family_dirs, tiny_cache_dir), lora={"r": 4, "alpha": 8})
    perturb_(bb.model, 0.3, 2)  # only the adapters are trainable: they move
    images, prompts, _, _ = rows
    shared = bb.generate(images, prompts, max_new_tokens=5, num_return_sequences=2)
    plain = bb.generate(images, prompts, max_new_tokens=5)
    assert shared == [t for t in plain for _ in range(2)], name
    with bb.model.disable_adapter():
        base = bb.generate(images, prompts, max_new_tokens=5)
    assert base != plain  # the adapters change the policy: the test sees them

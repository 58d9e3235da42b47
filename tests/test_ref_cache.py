"""Reference log-prob cache: cached values equal the reference forward, keys cover model and
data (and nothing else: padding / batch composition do not matter), on-policy negatives are
never stored, shards persist atomically per rank, and CWDPOModule gives the same loss."""

from __future__ import annotations

from functools import partial

import torch

from cwdpo.batch import PairBatch
from cwdpo.model.loading import LoRASettings
from cwdpo.model.ref_cache import (
    RefLogpCache,
    cached_reference_logps,
    module_fingerprint,
    pair_keys,
    reference_fingerprint,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _batch(bb, pb, idx=None):
    idx = list(range(len(pb))) if idx is None else idx
    return bb.collate_pairs(
        [pb.images[i] for i in idx],
        [pb.prompts[i] for i in idx],
        [pb.chosen[i] for i in idx],
        [pb.rejected[i] for i in idx],
    )


class _CountingRef:
    """Wraps a backbone, counting the pairs that reach the reference forward."""

    def __init__(self, bb) -> None:
        self.bb, self.pairs = bb, 0

    def pair_logps(self, batch, n, **kw):
        self.pairs += n
        return self.bb.pair_logps(batch, n, **kw)


def test_hits_equal_reference_and_skip_forward(backbone, pair_batch, tmp_path, perturb):
    backbone.snapshot_reference()
    perturb(backbone.model)
    n = len(pair_batch)
    batch = _batch(backbone, pair_batch)
    expected = backbone.logps(batch, reference=True).sum
    cache = RefLogpCache(tmp_path).bind(reference_fingerprint(backbone))
    counter = _CountingRef(backbone)
    first = cached_reference_logps(counter, cache, batch, n)
    assert counter.pairs == n and len(cache) == n and cache.misses == n
    torch.testing.assert_close(first, expected, **TOL)
    # the same pairs again, in another batch (other order, other padding): all hits, no forward
    sub = _batch(backbone, pair_batch, [2, 0])
    again = cached_reference_logps(counter, cache, sub, 2)
    assert counter.pairs == n and cache.hits == 2
    torch.testing.assert_close(again, expected[[2, 0, n + 2, n]], atol=0, rtol=0)
    # a partial hit computes only the missing pair
    cache.table.pop(pair_keys(batch, n, cache.fingerprint)[1])
    mixed = cached_reference_logps(counter, cache, batch, n)
    assert counter.pairs == n + 1
    torch.testing.assert_close(mixed, expected, **TOL)


def test_keys_cover_data_and_model(backbone, pair_batch, perturb):
    n = len(pair_batch)
    batch = _batch(backbone, pair_batch)
    keys = pair_keys(batch, n, "fp")
    assert len(set(keys)) == n
    assert pair_keys(batch, n, "other-model") != keys  # model fingerprint
    swapped = backbone.collate_pairs(  # chosen ↔ rejected is another pair
        pair_batch.images, pair_batch.prompts, pair_batch.rejected, pair_batch.chosen
    )
    assert not set(pair_keys(swapped, n, "fp")) & set(keys)
    other_img = backbone.collate_pairs(
        pair_batch.images[::-1], pair_batch.prompts, pair_batch.chosen, pair_batch.rejected
    )
    assert pair_keys(other_img, n, "fp")[0] != keys[0]  # image bytes
    backbone.truncation = "warn"
    backbone.max_length = 84  # truncation (cut rows still differ) changes the tokens, hence the key
    assert pair_keys(_batch(backbone, pair_batch), n, "fp") != keys
    fp = module_fingerprint(backbone.model)
    perturb(backbone.model)
    assert module_fingerprint(backbone.model) != fp


def test_lora_fingerprint_is_the_base(tiny_vlm_path, perturb):
    from cwdpo.model.backbone import VLMBackbone

    torch.manual_seed(0)
    bb = VLMBackbone.from_pretrained(
        tiny_vlm_path, lora=LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    bb.snapshot_reference()
    fp = reference_fingerprint(bb)
    perturb(bb.model)  # trains the adapters only: π_ref (adapters disabled) is unchanged
    assert reference_fingerprint(bb) == fp
    bb.snapshot_reference()  # merge → new base → new reference
    assert reference_fingerprint(bb) != fp


def test_on_policy_negatives_never_stored(backbone, pair_batch, tmp_path):
    backbone.snapshot_reference()
    n = len(pair_batch)
    batch = _batch(backbone, pair_batch)
    cache = RefLogpCache(tmp_path).bind(reference_fingerprint(backbone))
    counter = _CountingRef(backbone)
    cacheable = torch.tensor([1.0, 0.0, 1.0, 0.0])  # PairBatch.neg_is_dataset
    cached_reference_logps(counter, cache, batch, n, cacheable)
    assert len(cache) == 2
    cached_reference_logps(counter, cache, batch, n, cacheable)
    assert counter.pairs == n + 2  # on-policy pairs are recomputed every time


def test_persistence_per_rank_and_corrupt_shard(backbone, pair_batch, tmp_path):
    backbone.snapshot_reference()
    n = len(pair_batch)
    fp = reference_fingerprint(backbone)
    b0, b1 = _batch(backbone, pair_batch, [0, 1]), _batch(backbone, pair_batch, [2, 3])
    for rank, b in ((0, b0), (1, b1)):
        c = RefLogpCache(tmp_path, rank=rank).bind(fp)
        cached_reference_logps(backbone, c, b, 2)
        assert c.flush() == tmp_path / fp[:16] / f"rank{rank}.safetensors"
        assert c.flush() is None  # nothing new
    merged = RefLogpCache(tmp_path).bind(fp)
    assert len(merged) == n
    assert not list((tmp_path / fp[:16]).glob("*.tmp"))
    (tmp_path / fp[:16] / "rank7.safetensors").write_bytes(b"garbage")
    assert len(RefLogpCache(tmp_path).bind(fp)) == n  # ignored, not fatal
    assert len(RefLogpCache(tmp_path).bind("0" * 64)) == 0  # another reference: nothing


def test_cw_dpo_module_with_cache(backbone, pair_batch, tmp_path, perturb):
    from cwdpo.stages import CWDPOModule

    backbone.snapshot_reference()
    perturb(backbone.model)
    batch = PairBatch(inputs=_batch(backbone, pair_batch), n=len(pair_batch))
    opt = partial(torch.optim.SGD, lr=0.1)
    plain = CWDPOModule(backbone, optimizer=opt)
    cached = CWDPOModule(backbone, optimizer=opt, ref_cache=str(tmp_path), prefix_sharing=True)
    cached.ref_cache.bind(reference_fingerprint(backbone))  # what on_fit_start does
    want, _ = plain.compute(batch)
    for _ in range(2):  # miss, then hit
        got, _ = cached.compute(batch)
        torch.testing.assert_close(got, want, **TOL)
    assert cached.ref_cache.hits == len(pair_batch)

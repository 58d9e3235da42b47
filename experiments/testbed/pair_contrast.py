"""How many self-judged stage-2 pairs contrast the planted error (issue 17)?

For each stage-2 run given, re-draw its self-judged pairs the way training does — K samples per
stage-2 image from the run's start policy (π_ref = its SFT-C checkpoint), judged by the verifier,
chosen = best, rejected = worst when the score gap is ≥ min_gap — and count, over the images
whose scene has the co-occurrence trigger but not the companion:
  - the share of the K own samples that hallucinate the companion;
  - pairs whose rejected names the companion and whose chosen does not (corrective),
    the reverse (anti-corrective), both or neither naming it, and images with no pair;
  - in the anti-corrective pairs, the true objects each side leaves out (why the judge
    preferred the caption that hallucinates);
  - the corrective share of the pairs (issue 28's goal for `negatives=companion_edit`: ≥ 90%),
    per run and pooled over the runs.
The draw is a fresh one (seeded with the run's seed), not the training run's own samples.

    python experiments/testbed/pair_contrast.py experiments/testbed/runs/cooc_c0.12/seed*/cw_dpo \
        --out experiments/testbed/cooc_c0.12_tuned/pair_contrast.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cwdpo.callbacks.on_policy import sample_captions
from cwdpo.data.verifier import mentions_object, verify
from cwdpo.model.backbone import VLMBackbone
from cwdpo.run.pipeline import build_datamodule, stage_records


def pair_kind(chosen: str, rejected: str, companion: tuple[str, str]) -> str:
    """On an image without the companion: does the pair teach to drop it (`corrective`: only
    the rejected caption names it), to add it (`anti_corrective`), or neither way?"""
    c, r = mentions_object(chosen, *companion), mentions_object(rejected, *companion)
    if c != r:
        return "corrective" if r else "anti_corrective"
    return "both" if c else "neither"


def run_config(run: Path) -> DictConfig:
    """The run's config, composed afresh from its command-line overrides (runs older than the
    current config layout keep their meaning)."""
    from hydra import compose, initialize_config_dir

    from cwdpo.run.config import CONFIG_DIR
    from cwdpo.utils.overrides import plain_group_overrides

    overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    keep = [o for o in overrides if not o.startswith("hydra.")]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=plain_group_overrides(keep))


def contrast(run: Path) -> dict[str, float]:
    cfg = run_config(run)
    source = hydra.utils.instantiate(cfg.data.source)
    trigger, comp = source.cooc
    backbone = VLMBackbone.from_pretrained(cfg.model.path, max_length=int(cfg.model.max_length))
    records = stage_records(cfg, source, ["cw_dpo"])
    dm = build_datamodule("cw_dpo", cfg, source, records, backbone)
    torch.manual_seed(int(cfg.seed))
    backbone.model.eval()
    samples = sample_captions(backbone.generate, dm.train_records, source.prompt, dm.neg)
    dm.set_negatives(list(enumerate(samples)), 0)
    counts: Counter[str] = Counter()
    halluc = n_samples = 0
    omitted: Counter[str] = Counter()
    for rec, own in zip(dm.train_records, samples):
        ids = {(o.colour, o.shape) for o in rec.meta["scene"].objects}
        if trigger not in ids or comp in ids:
            continue
        counts["images"] += 1
        k_own = own[1:] if dm.neg.greedy_candidate else own  # the K samples, not the greedy one
        halluc += sum(mentions_object(t, *comp) for t in k_own)
        n_samples += len(k_own)
        pair = dm.buffer.get(rec.image_id, [])
        if len(pair) < 2:
            counts["no_pair"] += 1
            continue
        kind = pair_kind(pair[0], pair[1], comp)
        counts[kind] += 1
        if kind == "anti_corrective":  # why the judge preferred the hallucinating caption
            scene = rec.meta["scene"]
            omitted["chosen"] += verify(pair[0], scene).omitted
            omitted["rejected"] += verify(pair[1], scene).omitted
    n = counts["images"]
    out = {"run": str(run), "seed": int(cfg.seed), "trigger_no_companion_images": n}
    out["counts"] = dict(counts)
    out["own_samples"], out["own_samples_halluc"] = n_samples, halluc
    out.update(shares(counts, halluc, n_samples))
    for side in ("chosen", "rejected"):  # true objects left out, per anti-corrective pair
        out[f"anti_{side}_omitted"] = omitted[side] / max(counts["anti_corrective"], 1)
    out["stage2_images"] = len(dm.train_records)
    return out


def shares(counts: Counter[str], halluc: int, n_samples: int) -> dict[str, float]:
    """Percentages of the trigger-without-companion images by pair kind, of the own samples
    that name the companion, and the corrective share of the images that have a pair."""
    n = counts["images"]
    out = {"own_samples_halluc_pct": 100.0 * halluc / max(n_samples, 1)}
    for k in ("corrective", "anti_corrective", "both", "neither", "no_pair"):
        out[f"{k}_pct"] = 100.0 * counts[k] / max(n, 1)
    paired = sum(counts[k] for k in ("corrective", "anti_corrective", "both", "neither"))
    out["corrective_share_of_pairs"] = 100.0 * counts["corrective"] / max(paired, 1)
    return out


def pooled(rows: list[dict]) -> dict[str, float]:
    """The runs' counts summed: shares over every trigger-without-companion image of all runs."""
    c: Counter[str] = Counter()
    for r in rows:
        c.update(r["counts"])
    halluc = sum(r["own_samples_halluc"] for r in rows)
    n_samples = sum(r["own_samples"] for r in rows)
    return {
        "runs": len(rows),
        "trigger_no_companion_images": c["images"],
        **shares(c, halluc, n_samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="stage-2 run dirs (self-judged negatives)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = [contrast(r) for r in args.runs]
    total = pooled(rows)
    for row in [*rows, total]:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    if args.out:
        args.out.write_text(json.dumps({"runs": rows, "pooled": total}, indent=1) + "\n")


if __name__ == "__main__":
    main()

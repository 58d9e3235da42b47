"""ShapesWorld: a procedural image-caption world with known ground truth.

Every scene is a few coloured shapes on a canvas; captions are generated from several
templates (so CIDEr has multiple references) and a parser turns any caption back into
facts, so we can say exactly which statements are wrong. Negatives come in graded
difficulty: *hard/gentle* (one attribute perturbed) and *easy* (another scene's caption,
shuffled words, off-distribution text).

Split by concern: `world` (words, scenes, rendering, sampling, templates), `facts` (caption ->
facts -> scores), `negatives` (graded negatives), `dataset` (seeded splits as records and
pairs). Everything is re-exported here, so `from cwdpo.data.shapes import X` keeps working.
"""

from cwdpo.data.shapes.dataset import ShapesWorld
from cwdpo.data.shapes.facts import Facts, fact_accuracy, fact_scores, parse_caption
from cwdpo.data.shapes.negatives import easy_negative, hard_negative
from cwdpo.data.shapes.world import (
    COLOURS,
    DISTRACTORS,
    NUMBERS,
    POSITIONS,
    PROMPT,
    SHAPES,
    SIZES,
    TEMPLATE_WORDS,
    Obj,
    Scene,
    WorldConfig,
    annotate,
    caption,
    references,
    render_scene,
    sample_scene,
    vocabulary,
)

__all__ = [
    "COLOURS",
    "DISTRACTORS",
    "NUMBERS",
    "POSITIONS",
    "PROMPT",
    "SHAPES",
    "SIZES",
    "TEMPLATE_WORDS",
    "Facts",
    "Obj",
    "Scene",
    "ShapesWorld",
    "WorldConfig",
    "annotate",
    "caption",
    "easy_negative",
    "fact_accuracy",
    "fact_scores",
    "hard_negative",
    "parse_caption",
    "references",
    "render_scene",
    "sample_scene",
    "vocabulary",
]

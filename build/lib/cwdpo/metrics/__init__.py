"""torchmetrics Metrics for evaluation: COCO caption scores, pairwise win rate (+ judges), calibration.

All are ``torchmetrics.Metric`` subclasses usable inside Lightning (``update`` per step,
``compute`` per epoch, DDP-synced by torchmetrics) and standalone; ``compute()`` returns a flat
``dict`` suitable for ``LightningModule.log_dict``.
"""

from cwdpo.metrics.calibration import PreferenceCalibration, TokenCalibration
from cwdpo.metrics.captioning import CaptionMetrics, python_ptb_tokenize, tokenize_captions
from cwdpo.metrics.winrate import (
    FactsJudge,
    HttpJudge,
    HttpJudgeError,
    Judge,
    ReferenceJudge,
    ScoreJudge,
    WinRate,
    parse_verdict,
)

__all__ = [
    "CaptionMetrics",
    "FactsJudge",
    "HttpJudge",
    "HttpJudgeError",
    "Judge",
    "PreferenceCalibration",
    "ReferenceJudge",
    "ScoreJudge",
    "TokenCalibration",
    "WinRate",
    "parse_verdict",
    "python_ptb_tokenize",
    "tokenize_captions",
]

"""pycocoevalcap's scorers as COCOEvalCap runs them, and one long-lived METEOR JVM per process.

Why shared: METEOR spends ~20 s loading its paraphrase table when its JVM starts, which
per-epoch evaluation would otherwise pay every time; the other scorers are pure Python.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

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

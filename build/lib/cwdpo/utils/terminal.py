"""A newcomer's terminal: each log line once, no library tips or known-harmless noise.

Why: `import lightning` adds its own stderr handler to the "lightning" logger, which also
propagates to the root logger Hydra configured — so every Lightning INFO line was printed
twice (once as `INFO: ...` on stderr, once in Hydra's format). Lightning also advertises a
product on every `Trainer`, and a CW-DPO stage always has modules in eval mode on purpose (the
frozen reference), which Lightning warns about at every stage start.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) of warnings that are expected in every cwdpo run and say nothing
# actionable to its user.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"Found \d+ module\(s\) in eval mode"),  # π_ref, frozen towers: on purpose
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning × torch
    (FutureWarning, r"`past_key_values` is deprecated"),  # transformers, inside generate()
    (UserWarning, r".*does not have many workers"),  # num_workers=0 is the CPU default
)
TIP_PREFIXES = ("💡 Tip",)
HARMLESS_HF_LOGS = (  # transformers' own logger (it does not go through `warnings`)
    "`past_key_values`/`cache_params` are deprecated",  # inside generate(), not our call
    "requires torchvision",  # the PIL image processor is used instead: same pixels on CPU
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIP_PREFIXES)


class _DropHarmlessHF(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.getMessage())
        return not any(h in msg for h in HARMLESS_HF_LOGS)


def tidy_terminal() -> None:
    """Call once logging is configured (Hydra's `main`), before training starts."""
    import lightning  # noqa: F401  (its import adds the duplicate handler this removes)

    if logging.getLogger().handlers:  # the root logger prints: Lightning's own handler doubles
        lg = logging.getLogger("lightning")
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" per stage
        hf_logging.get_logger("transformers")  # sets up its handler, to filter on
        for h in logging.getLogger("transformers").handlers:
            if not any(isinstance(f, _DropHarmlessHF) for f in h.filters):
                h.addFilter(_DropHarmlessHF())
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass

"""`python -m cwdpo.doctor model=<entry> model.path=<checkpoint>`: check a model before a long run.

A multi-day preference run on a model whose labels, masks or stop tokens are subtly wrong
computes something wrong for days. The doctor runs the family-matrix checks (tests/
test_families.py) on the user's own checkpoint and a few rows of their data (or ShapesWorld),
in minutes on one GPU or CPU, prints a pass/fail table with the numbers and exits non-zero
when a check fails:

- labels: decoded label tokens are exactly the response + the template's turn-end token;
- one BOS per row;
- log-probs: batched, padded rows equal an independent unpadded per-row HF forward, built by
  the family's own processor on the full text (its own positions and attention: Qwen M-RoPE,
  Gemma3 bidirectional image spans, PaliGemma prefix-LM via `suffix=`);
- label leak: changing a later response token never moves an earlier log-prob;
- prefix sharing / reference cache: equal to the plain reference log-probs;
- generation: stops at the turn-end token; batched generation equals per-row generation;
- LoRA: the configured targets matched modules (and which parts of the model they are in).
"""

# A thin Hydra CLI (the doctor's work is cwdpo.run.doctor.run_doctor; the checks are in
# cwdpo.model.checks).
from __future__ import annotations

import sys
from typing import Any

from cwdpo.run.doctor import run_doctor


def main() -> None:
    import hydra

    from cwdpo.run.config import CONFIG_DIR

    code = {"rc": 0}

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="doctor")
    def _main(cfg: Any) -> None:
        code["rc"] = run_doctor(cfg)[1]

    _main()
    sys.exit(code["rc"])


if __name__ == "__main__":
    main()

"""Import hygiene of the report and plotting paths, each checked in a fresh interpreter:
`cwdpo.report` loads no model layer (no transformers, no torch) and the training pipeline
reaches its end-of-run plots without the plot CLI or matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.subprocess  # every test starts a fresh interpreter


def _modules_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints a JSON object, returned here."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_report_imports_no_model_code():
    got = _modules_after(
        """
        import json, sys
        import cwdpo.report
        heavy = ("transformers", "torch", "matplotlib", "lightning")
        print(json.dumps({
            "heavy": [m for m in heavy if m in sys.modules],
            "model": sorted(m for m in sys.modules if m.startswith("cwdpo.model")),
        }))
        """
    )
    assert got == {"heavy": [], "model": []}


def test_pipeline_plots_without_the_plot_cli_or_matplotlib():
    # lightning imports torchmetrics, whose plot helpers import matplotlib: what lightning
    # brings is not the pipeline's doing, so only what the pipeline adds on top is checked.
    got = _modules_after(
        """
        import json, sys
        import lightning, torchmetrics
        def mpl():
            return sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib")
        before = mpl()
        import cwdpo.analysis.dynamics_plots
        plots_alone = mpl()
        import cwdpo.run.pipeline
        print(json.dumps({
            "added_by_plots": sorted(set(plots_alone) - set(before)),
            "added_by_pipeline": sorted(set(mpl()) - set(before)),
            "plot_cli": "cwdpo.plot" in sys.modules,
        }))
        """
    )
    assert got == {"added_by_plots": [], "added_by_pipeline": [], "plot_cli": False}


def test_plotting_module_loads_matplotlib_only_to_draw():
    got = _modules_after(
        """
        import json, sys
        import cwdpo.analysis.dynamics_plots, cwdpo.analysis.report_plots, cwdpo.plot
        print(json.dumps("matplotlib" in sys.modules))
        """
    )
    assert got is False

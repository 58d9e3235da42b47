"""Reading finished runs and summarising them: report tables, paired statistics and plots.

Light by design (numpy, scipy, pandas, yaml; matplotlib only inside the plotting calls; no model
code), so `python -m cwdpo.report` / `python -m cwdpo.plot` and the pipeline's end-of-run plots
import no more than they use:

- `runs`: finished-run readers (results.json, stage metrics CSV, saved test captions);
- `baseline`: the win-rate of each run's captions against its baseline run;
- `stats`: grouping by setting, mean ± std, paired per-seed differences, selection on val;
- `inference`: small-sample tests of paired per-seed differences (t-interval / t-test, exact
  sign-flip, Holm, MDE, exact McNemar); `caption_tests`: caption-level McNemar of per-caption
  rates (e.g. companion_halluc) from saved test captions;
- `tables`: the report's columns and markdown; `report`: the whole report of a set of runs;
- `report_plots`: the report's bar charts and one-knob sweep curves;
- `dynamics` / `dynamics_plots`: probe and CW-DPO dynamics files of a run, and their plots.
"""

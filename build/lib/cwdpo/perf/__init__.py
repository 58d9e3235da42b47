"""Performance measurement: step throughput and memory of our training step vs TRL's, and the
GPU check that runs it with the GPU suite (`python -m cwdpo.bench`, `python -m cwdpo.gpu_check`).

Its own package, apart from `cwdpo.run` (the training pipeline) and `cwdpo.analysis` (reading
finished runs, no model code): a bench builds models, optimizers and TRL's trainer to time them.

- `memory`: peak step memory and the bytes held between steps;
- `variants`: what is timed (our paths, TRL's DPOTrainer, generation, the objective alone);
- `benchmark`: one bench run (interleaved timing, ratios, targets, the JSON);
- `summary`: the printed table and the markdown table over saved bench JSONs;
- `on_policy`: the on-policy section (`--on-policy`): plain vs shared-prefill sampling, and a
  short on-policy CW-DPO stage at two dataset sizes;
- `gpu_suite`: everything `cwdpo.gpu_check` runs on a GPU, and its summary.
"""

"""Benchmarks scored as the field scores them (POPE, CHAIR, AMBER, MMHal-Bench, MMMU, MMBench).

Each benchmark is a `Benchmark` (`base.py`): it reads its official local files into
`BenchItem`s, says how each item is asked (prompt + images + generation budget), and scores a
mapping {item id: generated answer} by the official rules. Generation and DDP gathering live in
the run layer, so a saved predictions file can be re-scored without a model.
"""

"""`python -m cwdpo.bench` runs end to end (smallest settings) and writes the JSON it prints:
every variant (ours plain / prefix / prefix+cache, cooling on/off, TRL, LoRA), the ratios
against the targets and generation tokens/s. A smoke test, not a timed test."""

from __future__ import annotations

import json

import torch

from cwdpo.bench import main
from cwdpo.perf.memory import PeakMemory, state_bytes


def test_bench_smoke(tiny_cache_dir, tiny_vlm_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = main(
        [
            "--cache",
            str(tiny_cache_dir),
            "--pairs",
            "2",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--gen-tokens",
            "4",
            "--gen-rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "vs TRL" in printed and "targets:" in printed
    saved = json.loads(out.read_text())
    assert set(saved["variants"]) == {
        "dpo/plain",
        "cwdpo/plain",
        "dpo/prefix",
        "cwdpo/prefix",
        "dpo/prefix+cache",
        "cwdpo/prefix+cache",
        "trl/dpo",
        "lora/cwdpo/prefix+cache",
        "lora/dpo/prefix+cache",
    }
    for v in saved["variants"].values():
        assert v["median_s"] > 0 and v["samples_per_s"] > 0 and v["state_mb"]["total"] > 0
    full = saved["variants"]["dpo/prefix"]["state_mb"]
    lora = saved["variants"]["lora/dpo/prefix+cache"]["state_mb"]
    assert full["reference"] > 0 and lora["reference"] == 0  # LoRA: no second model
    assert lora["total"] < full["total"]
    r = saved["ratios"]
    assert set(r["cw_overhead_vs_our_dpo"]) == {"plain", "prefix", "prefix+cache"}
    assert r["throughput_vs_trl"]["dpo/prefix+cache"] > 0
    assert saved["targets"]["our_best_dpo"].startswith("dpo/")
    assert saved["generation"]["tokens_per_s"] > 0
    c = saved["setup"]["composition"]
    assert c["image_tokens_per_row"] > c["response_tokens_per_row"]  # the captioning case
    assert res["ratios"] == r
    # make bench's table: one row per saved JSON, our paths and TRL's side by side
    from cwdpo.perf.summary import summarize

    table = summarize([out, out]).splitlines()
    assert len(table) == 4 and "prefix+cache vs TRL" in table[0]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[2] == "off" and float(cells[5]) == round(
        saved["variants"]["dpo/prefix+cache"]["samples_per_s"], 1
    )


def test_state_bytes_exact():
    model = torch.nn.Linear(10, 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    s = state_bytes(model, None, opt)
    assert s["weights"] == 110 * 4 and s["grads"] == 110 * 4 and s["reference"] == 0
    assert s["optimizer"] >= 2 * 110 * 4  # exp_avg + exp_avg_sq (+ step counters)


def test_cpu_peak_is_the_highest_sample_even_if_it_was_gone_before_the_exit(monkeypatch):
    """The sampler thread against a scripted RSS (no timing, no allocator): a spike of 8 MiB
    between two samples is the peak although RSS is back to the entry level at the exit."""
    import threading

    from cwdpo.perf import memory

    mib, base = 2**20, 100 * 2**20
    script = iter([base, base + 3 * mib, base + 8 * mib, base + 1 * mib])  # then the base again
    done = threading.Event()

    def rss() -> int:
        value = next(script, None)
        if value is None:
            done.set()
            return base
        return value

    monkeypatch.setattr(memory, "_rss_bytes", rss)
    with PeakMemory(torch.device("cpu")) as pm:
        assert done.wait(60), "the sampler never ran"
    assert pm.peak == 8 * mib and pm.total == base + 8 * mib


def test_rss_reader_sees_touched_memory():
    """`_rss_bytes` reads this process's resident set: 64 MiB touched (a fresh mmap) shows."""
    from cwdpo.perf.memory import _rss_bytes

    before = _rss_bytes()
    x = torch.ones(64 * 2**20 // 4)
    assert _rss_bytes() - before >= 48 * 2**20
    del x


def test_bench_on_policy_section(tiny_cache_dir, tiny_vlm_path, tmp_path, capsys):
    """`--on-policy`: both sampling paths draw the same tokens (same seed), the speed-up is
    their tokens/s ratio, and the stage-2 runs count samples consistently."""
    import pytest

    out = tmp_path / "on_policy.json"
    args = ["--on-policy", "--cache", str(tiny_cache_dir), "--out", str(out)]
    args += ["--on-policy-models", "llava", "--on-policy-k", "2", "3"]
    args += ["--on-policy-records", "2", "--gen-tokens", "3", "--gen-rounds", "2"]
    args += ["--on-policy-sizes", "16", "160", "--on-policy-steps", "1", "--on-policy-batch", "2"]
    res = main(args)
    printed = capsys.readouterr().out
    assert "K=3 speed-up" in printed and "samples/pair" in printed
    saved = json.loads(out.read_text())
    assert saved["sampling"] == res["sampling"]
    s = saved["sampling"]["llava"]
    assert s["records"] == 2 and s["image_tokens_per_record"] == 64  # the tiny LLaVA's 8×8
    for k in (2, 3):
        r = s["k"][str(k)]
        tokens = {r[p]["tokens"] for p in ("plain", "shared_dynamic", "shared")}
        assert len(tokens) == 1 and 0 < r["plain"]["tokens"] <= 2 * 2 * k * 3  # same draws
        assert r["speedup"] == pytest.approx(
            r["shared"]["tokens_per_s"] / r["plain"]["tokens_per_s"]
        )
        assert r["plain"]["seconds"] > 0 and r["shared"]["seconds"] > 0
    st = saved["stage2"]
    assert [r["train_images"] for r in st] == [16, 160]  # the warm-up run is not reported
    for r in st:
        assert r["stage2_records"] == r["train_images"] // 4  # data.stage_split: 75 / 25
        assert r["steps"] == 1 and r["pairs_trained"] == 2
        assert r["samples_generated"] > 0 and r["samples_generated"] % r["num_samples"] == 0
        assert r["samples_per_pair"] == r["samples_generated"] / r["pairs_trained"]
        assert 0 < r["first_step_s"] <= r["stage_train_s"]
        assert 0 < r["sampling_s"] <= r["stage_train_s"]
    assert saved["target"]["model"] == "llava@576" and saved["target"]["measured"] is None


def test_count_new_tokens_stops_at_the_first_stop_token():
    from cwdpo.perf.on_policy import count_new_tokens

    ids = torch.tensor([[9, 9, 1, 2, 7, 0], [9, 9, 7, 0, 0, 0], [9, 9, 1, 2, 3, 4]])
    assert count_new_tokens(ids, 2, [7], max_new=4) == 3 + 1 + 4
    assert count_new_tokens(ids, 2, [7, 2], max_new=4) == 2 + 1 + 2
    assert count_new_tokens(ids, 2, [7], max_new=2) == 2 + 1 + 2


def test_gpu_check_summary_carries_the_on_policy_table():
    from cwdpo.perf.gpu_suite import markdown

    s = {"device": "d", "suite": {"rc": 0, "seconds": 1.0}, "bench": [], "seconds": 3.0}
    s["on_policy"] = {"rc": 0, "seconds": 2.0, "table": "| model | K=4 speed-up |"}
    md = markdown(s)
    assert "## on-policy sampling (rc=0, 2.0 s)" in md and "| model | K=4 speed-up |" in md

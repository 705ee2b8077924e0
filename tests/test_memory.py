"""bench/memory.py and bench/gpu_table.py at tiny dims, on the CPU (CI tier): the tracker counts live
tensor bytes, its categories sum to the peak it reports, the fit reproduces its inputs and the projection
meets its own validation; the GPU script's tiny mode runs the same code path; the committed results file
has every family x preset x base, and the README's memory table is generated from it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import memory  # noqa: E402


def run(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    run("memory.py", "--tiny", "--out", str(out))
    return out, json.loads(out.read_text())


def test_the_tracker_counts_live_bytes_and_frees_them():
    t = memory.MemoryTracker()
    keep = torch.zeros(1000)
    t.register([keep], "base weights")
    with t:
        a = torch.ones(500)  # 2000 bytes, live at the peak
        b = a * 2  # 2000 more
        del a, b
        c = torch.ones(100)  # 400: after the peak
    assert t.peak == 4000 + 4000 and t.peak_by_cat["base weights"] == 4000
    assert t.peak_by_cat["activations (student forward)"] == 4000
    assert t.total == 4000 + 400 and c.numel() == 100
    assert sum(t.peak_by_cat.values()) == t.peak


def test_categories_sum_to_the_tracked_peak(tiny):
    _, r = tiny
    points = [memory.expand(p) for p in r["points"] + r["validation_points"]]
    assert len(points) == 12
    for p in points:
        assert sum(p["peak_by_category"].values()) == p["peak_bytes"]
        for phase, cats in p["phase_by_category"].items():
            dyn = sum(v for c, v in cats.items() if c not in memory.STATIC and c != "gradients")
            assert dyn == p["phase_peak_bytes"][phase]
        if p["setup"]["method"] == "dopsd":
            assert p["phase_peak_bytes"]["teacher"] > 0
        else:
            assert p["phase_peak_bytes"]["teacher"] == 0  # SFT runs no teacher
        assert p["peak_by_category"]["base weight casts"] >= 0 and p["peak_by_category"]["base weights"] > 0


def test_static_bytes_are_the_computed_ones(tiny):
    _, r = tiny
    assert all(v < 1e-3 for v in r["static_check_max_rel_error"].values()), r["static_check_max_rel_error"]


def test_the_fit_reproduces_its_inputs_and_the_projection_its_validation(tiny):
    _, r = tiny
    entry = r["fit"]["klein4b|ckpt|tiny"]
    assert set(entry) == {"student", "teacher", "sft"}
    assert all(e["max_rel_residual"] < 0.1 for e in entry.values()), entry  # tiny widths: LoRA and gradients weigh as much as activations
    refit = memory.fit([memory.expand(p) for p in r["points"]])
    assert refit["klein4b|ckpt|tiny"]["student"]["coef"] == pytest.approx(entry["student"]["coef"])
    assert len(r["validation"]) == 2 and r["validation_max_abs_error_pct"] <= 10.0


def test_the_gpu_script_tiny_mode_runs_the_same_path(tiny, tmp_path):
    mem, _ = tiny
    out = tmp_path / "gpu.json"
    summary = run("gpu_table.py", "--tiny", "--memory-json", str(mem), "--out", str(out))
    r = json.loads(out.read_text())
    assert summary["rows"] == 4 and r["skipped"] == [] and r["tiny"] is True
    for row in r["rows"]:
        assert row["max_memory_allocated_bytes"] > 0 and row["s_per_step"] > 0
        if row["checkpointing"]:  # the tiny fit has checkpointing only
            assert abs(row["projection_error_pct"]) <= 15.0, row


def test_the_committed_results_cover_every_family_preset_and_base():
    r = json.loads((BENCH / "results" / "memory.json").read_text())
    rows = {(x["model"], x["preset"], x["base"]) for x in r["projection"]}
    for model in memory.MODELS:
        for label, _ in memory.presets(model):
            for base in memory.BASES:
                assert (model, label, base) in rows
    assert r["validation_max_abs_error_pct"] <= 10.0
    for x in r["projection"]:
        if x.get("not_projected"):  # says why (a reduced CPU sweep)
            assert not x["checkpointing"] and "CPU time" in x["not_projected"]
            continue
        assert x["dopsd_1024_gib"] > x["dopsd_768_gib"] > 0 and x["sft_1024_gib"] > 0


def test_every_gpu_preset_fits_the_card_it_names_with_an_fp8_base():
    r = json.loads((BENCH / "results" / "memory.json").read_text())
    for x in r["projection"]:
        if x["base"] == "fp8" and x["preset"].startswith("12 GB") and not x.get("not_projected"):
            assert 12 in x["dopsd_fits_gb"] or x["offload_blocks_12gb"], x["model"]


def test_the_readme_memory_table_is_generated_from_the_results():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_table.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr

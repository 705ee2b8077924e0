"""bench/step_cost.py: --json is one well-formed object on a tiny toy config, and the real-shape models
have the real parameter counts (computed on the meta device, nothing is allocated)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step_cost.py"


def run_bench(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH), *args, "--json"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("states", ["all", "one"])
def test_step_cost_json_is_well_formed(states):
    r = run_bench("--batch", "2", "--k", "2", "--states", states, "--iters", "1", "--warmup", "0", "--threads", "1")
    for key in ("time_ratio", "memory_ratio", "bound_ratio"):
        assert isinstance(r[key], float) and 0.0 < r[key] < 100.0, (key, r[key])
        assert r["spread"][key]["runs"] == [r[key]]
    assert r["time_ratio"] == pytest.approx(r["dopsd_step_s"] / r["sft_step_s"])
    assert r["memory_ratio"] == pytest.approx(r["peak_mib"]["dopsd"] / r["peak_mib"]["sft"])
    assert set(r["activation_share"]) == {"sft", "dopsd"}
    assert all(0.0 <= v < 1.0 for v in r["activation_share"].values())
    # the bound is n x (teacher forward + student forward/backward), n = supervised states
    n = 2 if states == "all" else 1
    assert r["bound_s"] == pytest.approx(n * (r["teacher_fwd_s"] + r["student_fwd_bwd_s"]))
    expected = {"memory_ratio", "bound_ratio"} if states == "all" else {"memory_ratio", "one_state_time_ratio"}
    assert set(r["targets"]) == expected
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert r["all_targets_met"] == all(t["met"] for t in r["targets"].values())
    assert r["one_state_vs_sft"] == (r["time_ratio"] if states == "one" else None)
    cfg = r["config"]
    assert (cfg["model"], cfg["k"], cfg["states"], cfg["batch"], cfg["impl"]) == ("toy", 2, states, 2, "toy")
    assert r["device"] == "cpu" and r["versions"]["torch"]


def test_real_shape_models_have_the_real_sizes():
    r = run_bench("--model", "klein4b", "--estimate", "--dtype", "fp8", "--rank", "64")
    assert r["computed_not_measured"] is True
    m = r["models"]["klein4b"]
    assert 3.7e9 < m["counts"]["base_params"] < 4.1e9  # FLUX.2-klein-4B
    assert m["counts"]["lora_modules"] == 5 * 8 + 20 * 2  # klein preset targets (docs/method.md): 5 double x 8 + 20 single x 2
    # fp8 base: about one byte per weight (norm-free Linears only)
    assert m["gib"]["base_weight_bytes"] == pytest.approx(m["counts"]["base_params"] / 2**30, rel=0.01)
    both = run_bench("--model", "zimage", "--estimate", "--dtype", "bf16", "--rank", "16")["models"]["zimage"]
    assert 5.9e9 < both["counts"]["base_params"] < 6.4e9  # Z-Image-Turbo (6B)
    assert both["counts"]["lora_modules"] == 34 * 5
    assert both["gib"]["adamw8bit_state_bytes"] < both["gib"]["adamw_state_bytes"]


@pytest.mark.parametrize("name", ["klein4b", "zimage"])
@pytest.mark.parametrize("dtype,ckpt", [("fp32", False), ("bf16", True), ("fp8", True)])
def test_same_shape_modules_train_with_dopsd(name, dtype, ckpt, tmp_path, monkeypatch):
    """The bench's own modules at a tiny width (same code path as the full-size ones): D-OPSD steps run
    in every base dtype, with checkpointing, on the family's LoRA targets, and change the LoRA."""
    import torch
    sys.path.insert(0, str(BENCH.parent))
    import shapes
    from dopsd_core.denoiser import Record
    from dopsd_core.trainer import TrainConfig, Trainer
    s = shapes.SPECS[name]
    tiny = shapes.Spec(**{**s.__dict__, "hidden": 64, "heads": 2, "context_dim": 32, "mlp_hidden": 96,
                          "depth": 1, "depth_single": 1})
    monkeypatch.setitem(shapes.SPECS, name, tiny)
    model = shapes.build_model(name, dtype)
    if dtype == "fp8":
        assert model.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn if name == "zimage" else \
            model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    den = shapes.ShapesDenoiser(name, model, 64, torch.float32 if dtype == "fp32" else torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(den.latent_shape, generator=g)
    text = torch.randn(1, 8, tiny.context_dim, generator=g)
    rec = Record("a", x0, ["c"], [shapes.BenchContext(text)], [shapes.teacher_context(tiny, text, x0, g)])
    tr = Trainer(den, [rec], TrainConfig(steps=2, rank=4, alpha=4.0, lr=1e-2, k=2, checkpointing=ckpt),
                 tmp_path / "run")
    before = {k: v.clone() for k, v in tr.lora.state_dict_comfy().items()}
    hist = tr.run().history
    assert len(hist) == 2 and all(v > 0 and v == v for v in hist)
    after = tr.lora.state_dict_comfy()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_up.weight"))
    prefixes = ("double_blocks.0.", "single_blocks.0.") if name == "klein4b" else \
        ("layers.0.", "noise_refiner.0.", "context_refiner.0.")
    assert {t.split(".")[0] + "." + t.split(".")[1] + "." for t in tr.lora.targets} == set(prefixes)


def test_arm_processes_get_a_fixed_mmap_threshold_unless_asked_not_to(monkeypatch):
    """Peak RSS must count live tensors: each arm runs with glibc's dynamic mmap threshold turned off
    (docs/benchmarks.md, 'the extra memory was the allocator'); an explicit user value or DOPSD_BENCH_GLIBC_DEFAULTS=1 wins."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("step_cost", BENCH)
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("DOPSD_BENCH_GLIBC_DEFAULTS", raising=False)
    assert step_cost.arm_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert step_cost.arm_env()["MALLOC_MMAP_THRESHOLD_"] == "65536"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("DOPSD_BENCH_GLIBC_DEFAULTS", "1")
    assert "MALLOC_MMAP_THRESHOLD_" not in step_cost.arm_env()


def _run_cost():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dopsd_run_cost", BENCH.parent / "run_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("setting", [dict(method="dopsd", states="all", prior_states="same", prior_every=1),
                                     dict(method="dopsd", states="one", prior_states="all", prior_every=1),
                                     dict(method="dopsd", states="two", prior_states="one", prior_every=4),
                                     dict(method="sft", prior_every=2)])
def test_run_cost_counts_evaluations_as_the_toy_study_does(setting):
    from experiments.toy.lab.study import evals_per_step
    rc = _run_cost()
    p = rc.passes_per_step(k=4, batch_size=1, grad_accum=4, prior_batch=1, **setting)
    lab = evals_per_step(setting["method"], True, k=4, batch=4, states=setting.get("states", "all"),
                         prior_states=setting.get("prior_states", "same"), prior_batch=4, prior_every=setting["prior_every"])
    assert p["evals"] == pytest.approx(lab)


def test_run_cost_flops_are_the_closed_form_of_the_klein_shapes():
    """klein-4B at 1024²: every token passes one stream of each of the 25 blocks, 4h² + 3mh weights a block
    (qkv, proj, the gated MLP), plus attention's 4 T² h a block; the teacher also carries the reference latent."""
    rc = _run_cost()
    f = rc.flops("klein4b", 1024)
    h, m, blocks = 3072, 9216, 5 + 20

    def closed(t):
        return (2 * t * blocks * (4 * h * h + 3 * m * h) + 4 * t * t * h * blocks) / 1e12
    assert f["student_fwd"] == pytest.approx(closed(4096 + 512), rel=0.01)
    assert f["teacher_fwd"] == pytest.approx(closed(2 * 4096 + 512), rel=0.01)
    # checkpointed backward: the recomputed forward plus about two forwards' worth of input gradients
    assert 2.8 < f["student_fwd_bwd"] / f["student_fwd"] < 3.5
    t = rc.cost_table("klein4b", 1024, steps=1000, tflops=400.0, settings={
        "d": dict(method="dopsd", states="all", prior_states="same", prior_every=1), "s": dict(method="sft", prior_every=1)})
    d, s = t["rows"]
    assert d["evals"] == 96_000 and s["evals"] == 16_000
    assert d["tflop_per_step"] == pytest.approx(32 * (f["teacher_fwd"] + f["student_fwd_bwd"]))
    assert d["gpu_hours"] == pytest.approx(d["pflop"] * 1e3 / 400 / 3600)


def test_the_committed_run_cost_table_has_the_families_defaults_of_now():
    """bench/results/run_cost_klein4b_1024.json is re-run when klein's defaults change: a row for the spec's
    levers exists (or they are still the released recipe's) and counts the evaluations they cost."""
    from dopsd_core.family_spec import FLUX2_KLEIN
    rc = _run_cost()
    table = json.loads((BENCH.parent / "results" / "run_cost_klein4b_1024.json").read_text())
    rows = {r["setting"]: r for r in table["rows"]}
    assert list(rows)[0] == rc.RELEASED_ROW
    (name, setting), = rc.spec_settings(FLUX2_KLEIN).items()
    row = rows.get(name, rows[rc.RELEASED_ROW] if setting == rc.SETTINGS[rc.RELEASED_ROW] else None)
    assert row is not None, "klein's defaults changed: re-run python bench/run_cost.py --out bench/results/run_cost_klein4b_1024.json"
    assert row["evals_per_step"] == pytest.approx(rc.passes_per_step(**{**table["family"], **setting})["evals"])

"""The GPU table: every family x GPU preset x base dtype at 1024², a few D-OPSD and SFT steps on the
full-size random-weight stand-ins (bench/shapes.py), built on the GPU. No internet, no ComfyUI, no
model files needed.

    python bench/gpu_table.py                      # one CUDA device; writes bench/results/gpu_table.json
    python bench/gpu_table.py --budget-s 420       # stop starting runs after this (default 420 s)
    python bench/gpu_table.py --tiny --out X.json  # the same code path on the CPU at tiny dims (CI)

Per run: the trainer of dopsd_core at batch 1, K = 4 (the families' K), LoRA rank / optimizer /
checkpointing of the preset, the real text lengths (klein: 512 caption tokens; its teacher sees the
target as a reference latent: 8192 image tokens; Z-Image: 128 caption tokens, a 1184-token Qwen3-VL
teacher context). One warm-up step, then `--steps` timed steps. Recorded: torch.cuda.max_memory_allocated
over those steps (reset after setup; weights, LoRA copies, optimizer state included),
max_memory_reserved, median seconds per step, and the error of bench/memory.py's projection for the
same configuration ((measured - projected) / projected, from bench/results/memory.json's fit).

Order: fp8 base first (the consumer cards' case), the 12 GB preset first; klein-9B last. A run that
the remaining budget cannot hold (estimated from the runs so far) is skipped and listed, as is one
whose projected peak exceeds the free device memory. Without bitsandbytes, 8-bit AdamW runs as AdamW
and the row says so (the projection is then made for AdamW as well).

The tiny mode runs the same functions on the CPU: klein-4B's layout at tiny widths, 2+2 blocks, 128 px,
K = 2, one step, the 12 GB preset and the family default;
the peak is the tensor-byte tracker's (bench/memory.py), the projection the tiny fit's (pass
--memory-json from `python bench/memory.py --tiny`).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import shapes  # noqa: E402

OUT = ROOT / "bench" / "results" / "gpu_table.json"
ORDER_MODELS = ("klein4b", "zimage", "klein9b")


def have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


def plan(tiny: bool) -> list[tuple[str, str, str, dict, str]]:
    """(base, model, preset label, preset, method) in run order."""
    runs = []
    for base in memory.BASES:
        for model in ORDER_MODELS:
            pre = memory.presets(model)
            ordered = pre[1:] + pre[:1]  # the GPU presets first, the family default (no checkpointing) last
            if tiny:
                ordered = [ordered[0], ordered[-1]]  # one checkpointed preset and the family default
            for label, preset in ordered:
                for method in ("dopsd", "sft"):
                    runs.append((base, model, label, preset, method))
        if tiny:
            break
    return [r for r in runs if not tiny or r[1] == "klein4b"]


def setup_for(base: str, model: str, preset: dict, method: str, tiny: bool, bnb: bool) -> memory.Setup:
    opt = preset["optimizer"] if bnb or preset["optimizer"] != "adamw8bit" else "adamw"
    if tiny:
        s = shapes.SPECS[model]
        return memory.Setup(model, 2, 2, 128, 16, 16 if s.kind == "flux2" else 48, method=method,
                            checkpointing=preset["checkpointing"], optimizer=opt, rank=preset["rank"],
                            store="fp8" if base == "fp8" else "fp32", compute="fp32", k=2, tiny=True)
    s = memory.real_setup(model, 1024, method, preset, base)
    return replace(s, optimizer=opt, k=4)


def run_one(setup: memory.Setup, model, device: torch.device, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dopsd-gpu-") as d:
        tr = memory.make_trainer(setup, model, device, Path(d) / "run")
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                times = []
                for i in range(1 + steps):
                    t0 = time.perf_counter()
                    tr.train_step()
                    torch.cuda.synchronize(device)
                    if i:
                        times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated(device)
                reserved = torch.cuda.max_memory_reserved(device)
            else:  # tiny mode: the tensor-byte tracker over one step
                t0 = time.perf_counter()
                tracker = memory.tracked_step(tr, model)
                times = [time.perf_counter() - t0]
                peak, reserved = tracker.peak, None
        finally:
            tr.lora.detach()
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"max_memory_allocated_bytes": peak, "max_memory_reserved_bytes": reserved,
            "s_per_step": statistics.median(times), "step_times_s": [round(t, 4) for t in times]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny dims (the CI test)")
    p.add_argument("--memory-json", type=Path, default=memory.RESULTS, help="the fit to compare with")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    p.add_argument("--only", default="", help="comma-separated models (default: all)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.tiny:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check, or on a GPU machine")
    else:
        device = torch.device("cuda")
    fits = json.loads(args.memory_json.read_text())["fit"] if args.memory_json.is_file() else {}
    bnb = have_bnb()
    rows, skipped = [], []
    only = set(args.only.split(",")) if args.only else None
    built = (None, None)  # (key, model): one model per family and base, reused by its runs
    per_run_s: dict[str, float] = {}
    for base, name, label, preset, method in plan(args.tiny):
        if only and name not in only:
            continue
        setup = setup_for(base, name, preset, method, args.tiny, bnb)
        what = f"{name} {base} [{label}] {method}"
        try:
            proj = memory.project(fits, setup, device="cpu" if args.tiny else "cuda")
        except KeyError:
            proj = None
        elapsed = time.perf_counter() - t_start
        est = per_run_s.get(f"{name}|{base}|{method}", per_run_s.get(f"{name}|{method}", 0.0))
        if elapsed + est > args.budget_s:
            skipped.append({"run": what, "why": f"budget: {elapsed:.0f} s spent + ~{est:.0f} s > {args.budget_s:.0f} s"})
            print(f"SKIP {what}: budget", flush=True)
            continue
        key = (name, base)
        if built[0] != key:
            built = (None, None)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            mdl = memory.build(replace(setup, method="dopsd"), device=device)
            built = (key, mdl)
            print(f"built {name} {base} in {time.perf_counter() - t0:.1f} s", flush=True)
        if device.type == "cuda" and proj is not None:
            free, _ = torch.cuda.mem_get_info(device)
            extra = proj["peak_bytes"] - memory.static_counts(name).base_params * {"fp8": 1, "bf16": 2}[base]
            if extra > free * 0.95:
                skipped.append({"run": what, "why": f"projected {proj['peak_gib']:.1f} GiB exceeds free memory"})
                print(f"SKIP {what}: memory", flush=True)
                continue
        t0 = time.perf_counter()
        try:
            res = run_one(setup, built[1], device, 1 if args.tiny else args.steps)
        except torch.OutOfMemoryError as e:
            skipped.append({"run": what, "why": f"out of memory: {str(e)[:200]}"})
            print(f"OOM {what}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        took = time.perf_counter() - t0
        per_run_s[f"{name}|{base}|{method}"] = took
        per_run_s.setdefault(f"{name}|{method}", took)
        row = {"model": name, "base": base, "preset": label, "method": method, "rank": setup.rank,
               "optimizer": setup.optimizer, "checkpointing": setup.checkpointing, "k": setup.k,
               "resolution": setup.resolution, "tokens": memory.tokens(setup), **res,
               "max_memory_allocated_gib": round(res["max_memory_allocated_bytes"] / memory.GIB, 3),
               "projected_gib": round(proj["peak_gib"], 3) if proj else None,
               "projection_error_pct": (round(100 * (res["max_memory_allocated_bytes"] - proj["peak_bytes"])
                                              / proj["peak_bytes"], 2) if proj else None),
               "run_s": round(took, 1)}
        if setup.optimizer != preset["optimizer"]:
            row["note"] = "bitsandbytes missing: AdamW instead of 8-bit AdamW"
        rows.append(row)
        print(f"{what}: {row['max_memory_allocated_gib']} GiB (projected {row['projected_gib']}, "
              f"error {row['projection_error_pct']} %), {res['s_per_step']:.2f} s/step", flush=True)
    versions = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        versions.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                        total_gib=round(torch.cuda.get_device_properties(device).total_memory / memory.GIB, 1))
    report = {"what": "bench/gpu_table.py: max_memory_allocated and s/step at 1024², stand-ins of bench/shapes.py",
              "tiny": args.tiny, "versions": versions, "bitsandbytes": bnb, "steps": args.steps,
              "wall_s": round(time.perf_counter() - t_start, 1), "rows": rows, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for s in skipped:
        print(f"skipped: {s['run']}: {s['why']}")
    print(json.dumps({"out": str(args.out), "rows": len(rows), "skipped": len(skipped), "wall_s": report["wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

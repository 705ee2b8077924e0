"""Cost of one D-OPSD step against one SFT step: same model, batch, resolution, LoRA.

    python bench/step_cost.py --json                                  # toy, K = 4, all states
    python bench/step_cost.py --k 8 --states one --json
    python bench/step_cost.py --model klein4b --depth 1 --resolution 256 --dtype bf16 --json   # CPU
    python bench/step_cost.py --model zimage --resolution 1024 --dtype fp8 --optimizer adamw8bit \\
        --checkpointing --batch 1 --json                               # GPU, full size
    python bench/step_cost.py --model klein9b --estimate --json       # computed sizes only, builds nothing

time_ratio      = D-OPSD step / SFT step (medians)
bound_ratio     = D-OPSD step / (n x teacher forward (teacher context, no grad) + n x student
                  forward+backward), n = supervised states; primitives timed in the same process as the
                  D-OPSD steps. All-K mode is the target; one-state mode also pays a no-grad prefix.
memory_ratio    = D-OPSD peak / SFT peak; each arm runs in its own process (peak RSS on CPU,
                  allocator peak on GPU)
activation_share = (peak - after setup) / peak, per arm (setup: runtime, weights, LoRA, data)
--repeats N runs the pair of arm processes N times and reports medians and the min-max spread.

Models: `toy` (the built-in toy), and `klein4b`, `klein9b`, `zimage` with the real layer shapes and
random weights: built from ComfyUI's own model classes when ComfyUI is importable (COMFYUI_PATH or on
sys.path, `--impl comfy`), else from bench/shapes.py's same-shape modules (`--impl own`). `--depth n`
keeps the full width and n blocks of each kind (for CPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dopsd_core.denoiser import Record  # noqa: E402
from dopsd_core.trainer import TrainConfig, Trainer  # noqa: E402

TARGETS = {"memory_ratio": 1.15, "bound_ratio": 1.1, "one_state_time_ratio": 3.0}
GPU_TARGET_GIB = {"zimage": 16.0, "klein4b": 12.0, "klein9b": 20.0}  # 1024^2, fp8 base: the consumer-GPU targets (docs/benchmarks.md)


def comfy_available() -> bool:
    if os.environ.get("COMFYUI_PATH"):
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
    try:
        import comfy.supported_models  # noqa: F401
        return True
    except Exception:
        return False


# --- models ---------------------------------------------------------------------------------------------
def build_toy(args, device):
    from dopsd_core.toy.denoiser import ToyContext, load_toy
    den = load_toy(device=str(device))
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(max(2, args.batch)):
        x0 = (torch.rand(den.latent_shape, generator=g) * 2 - 1).to(device)
        text = den.text_encoder.encode([f"a red [v{1 + i % 8}] on a black background"])
        records.append(Record(f"r{i}", x0, ["c"], [ToyContext(text)], [ToyContext(text, x0[None])]))
    return den, records


def build_own(args, device):
    import shapes
    model = shapes.build_model(args.model, args.dtype, args.depth, device=device)
    lora_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    den = shapes.ShapesDenoiser(args.model, model, args.resolution, lora_dtype)
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(max(2, args.batch)):
        x0 = torch.randn(den.latent_shape, generator=g).to(device)
        text = torch.randn(1, args.text_tokens, den.spec.context_dim, generator=g).to(device)
        student = shapes.BenchContext(text)
        records.append(Record(f"r{i}", x0, ["c"], [student], [den.teacher_context(text, x0, g)]))
    return den, records


def build_comfy(args, device):
    """The same shapes through ComfyUI's own classes (comfy.supported_models.Flux2 / ZImage) and our
    ComfyUI adapter, as the trainer node runs them."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import shapes
    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    spec = shapes.SPECS[args.model]
    if spec.kind == "flux2":
        unet = {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": spec.heads, "mlp_ratio": 3.0,
                "theta": 2000, "out_channels": 128, "in_channels": 128, "global_modulation": True,
                "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False, "default_ref_method": "index",
                "ref_index_scale": 10.0, "txt_ids_dims": [3], "patch_size": 1, "hidden_size": spec.hidden,
                "context_in_dim": spec.context_dim, "vec_in_dim": None, "guidance_embed": False,
                "depth": args.depth or spec.depth, "depth_single_blocks": args.depth or spec.depth_single}
        cfg = comfy.supported_models.Flux2(unet)
    else:
        unet = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": spec.hidden,
                "cap_feat_dim": spec.context_dim, "n_layers": args.depth or spec.depth,
                "n_refiner_layers": min(args.depth, 2) if args.depth else 2, "qk_norm": True,
                "n_heads": spec.heads, "n_kv_heads": spec.heads, "axes_dims": [32, 48, 48],
                "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
        cfg = comfy.supported_models.ZImage(unet)
    store, compute = shapes.DTYPES[args.dtype]
    cfg.set_inference_dtype(store, None if store == compute else compute)
    torch.manual_seed(0)
    base = cfg.get_model({}, device=device)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, device=p.device, dtype=torch.bfloat16 if store != torch.float32
                                 else torch.float32) * 0.02).to(p.dtype))
    mp = comfy.model_patcher.ModelPatcher(base, device, device)
    den = ComfyDenoiser(mp)
    side = args.resolution // spec.downsample
    den.latent_shape = (spec.latent_channels, side, side)
    g = torch.Generator().manual_seed(0)
    records = []
    make_weights_trainable(den.dm)
    mm.in_training = True  # differentiable RoPE, as hosts.comfy_train.train sets
    for i in range(max(2, args.batch)):
        x0 = torch.randn(den.latent_shape, generator=g).to(device)
        text = torch.randn(1, args.text_tokens, spec.context_dim, generator=g).to(device)
        t = shapes.teacher_context(spec, text, x0, g)
        extra = {"reference_latents": [x0[None]]} if t.ref is not None else {}
        records.append(Record(f"r{i}", x0, ["c"], [den.context(text, {}, x0)], [den.context(t.text, extra, x0)]))
    return den, records


def build(args, device):
    if args.model == "toy":
        return build_toy(args, device)
    if args.impl == "comfy" or (args.impl == "auto" and comfy_available()):
        return build_comfy(args, device)
    return build_own(args, device)


# --- measuring ------------------------------------------------------------------------------------------
def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device) -> list[float]:
    ts = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return ts


def run_arm(args) -> dict:
    """One method in this process: setup, warm-up, timed steps, then (D-OPSD arm) the primitives."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    den, records = build(args, device)
    cfg = TrainConfig(method=args.arm, steps=10**6, rank=args.rank, alpha=float(args.rank), lr=1e-4,
                      optimizer=args.optimizer, batch_size=args.batch, k=args.k, states=args.states,
                      checkpointing=args.checkpointing, compile=args.compile, seed=0)
    trainer = Trainer(den, records, cfg, Path(tempfile.mkdtemp(prefix="dopsd-bench-")))
    sync(device)
    after_setup = current_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        trainer.train_step()
    times = timed(trainer.train_step, args.iters, device)
    out = {"arm": args.arm, "step_s": statistics.median(times), "step_times_s": times,
           "peak_bytes": peak_bytes(device), "after_setup_bytes": after_setup}
    if args.arm == "dopsd":
        out.update(primitives(den, trainer, args, device))
    return out


def primitives(den, trainer, args, device) -> dict:
    """Median times of the two primitives a supervised state costs, at the roll-out's first state, run
    the way the objective runs them (teacher under inference_mode; student forward + backward)."""
    lora = den.lora()
    step_den = trainer.step_den
    batch = trainer.draw_batch()
    x = torch.randn(batch.x0.shape).to(device)
    s = torch.full((x.shape[0],), 1.0, device=device)

    def teacher():
        with torch.inference_mode(), lora.use("teacher"):
            step_den.denoise(x, s, batch.teacher_ctx)

    def student():
        with lora.use("student"):
            step_den.denoise(x, s, batch.student_ctx).float().pow(2).mean().backward()

    res = {}
    for name, fn in (("teacher_fwd_s", teacher), ("student_fwd_bwd_s", student)):
        timed(fn, args.warmup, device)
        res[name] = statistics.median(timed(fn, args.iters, device))
    trainer.opt.zero_grad(set_to_none=True)
    return res


def arm_env() -> dict:
    """Environment of an arm process. On CPU, peak RSS should count live tensors, not freed ones:
    glibc raises its mmap threshold each time a large mmapped block is freed, after which activation
    buffers come from the heap and their freed pages stay resident (fragmentation measured as memory).
    A fixed threshold (setting it turns the adjustment off) keeps every large buffer mmapped and returns
    it to the OS on free. Both arms get the same setting; an explicit user value wins."""
    env = dict(os.environ)
    if os.environ.get("DOPSD_BENCH_GLIBC_DEFAULTS") != "1":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    return env


def run_pair(args) -> dict:
    arms = {}
    for arm in ("sft", "dopsd"):
        cmd = [sys.executable, __file__, "--arm", arm] + [a for a in sys.argv[1:] if a != "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=arm_env())
        if res.returncode != 0:
            raise SystemExit(f"{arm} arm failed:\n{res.stderr[-4000:]}")
        arms[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    sft, dop = arms["sft"], arms["dopsd"]
    n_states = args.k if args.states == "all" else 1
    bound = n_states * (dop["teacher_fwd_s"] + dop["student_fwd_bwd_s"])
    return {
        "time_ratio": dop["step_s"] / sft["step_s"],
        "memory_ratio": dop["peak_bytes"] / sft["peak_bytes"],
        "bound_ratio": dop["step_s"] / bound,
        "activation_share": {a: (r["peak_bytes"] - r["after_setup_bytes"]) / r["peak_bytes"] for a, r in arms.items()},
        "sft_step_s": sft["step_s"], "dopsd_step_s": dop["step_s"], "bound_s": bound,
        "teacher_fwd_s": dop["teacher_fwd_s"], "student_fwd_bwd_s": dop["student_fwd_bwd_s"],
        "peak_mib": {a: r["peak_bytes"] / 2**20 for a, r in arms.items()},
        "after_setup_mib": {a: r["after_setup_bytes"] / 2**20 for a, r in arms.items()},
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def verdict(report: dict, args) -> dict:
    t = {"memory_ratio": {"value": report["memory_ratio"], "target": f"<= {TARGETS['memory_ratio']}",
                          "met": report["memory_ratio"] <= TARGETS["memory_ratio"]}}
    if args.states == "all":
        t["bound_ratio"] = {"value": report["bound_ratio"], "target": f"<= {TARGETS['bound_ratio']}",
                            "met": report["bound_ratio"] <= TARGETS["bound_ratio"]}
    else:
        t["one_state_time_ratio"] = {"value": report["time_ratio"], "target": f"<= {TARGETS['one_state_time_ratio']}",
                                     "met": report["time_ratio"] <= TARGETS["one_state_time_ratio"]}
    full_gpu = (args.device.startswith("cuda") and args.model in GPU_TARGET_GIB and args.depth is None
                and args.resolution == 1024)
    if full_gpu:
        gib = report["peak_mib"]["dopsd"] / 1024
        t["gpu_peak_gib"] = {"value": gib, "target": f"<= {GPU_TARGET_GIB[args.model]}",
                             "met": gib <= GPU_TARGET_GIB[args.model]}
    return t


def versions(device) -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "device": str(device)}
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
        v["cuda"] = torch.version.cuda
    else:
        try:
            v["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        v["cores"] = os.cpu_count()
    return v


def estimate(args) -> dict:
    import shapes
    out = {}
    for name in ([args.model] if args.model != "toy" else list(shapes.SPECS)):
        b = shapes.count_bytes(name, args.dtype, args.rank)
        gib = {k: v / 2**30 for k, v in b.items() if k.endswith("_bytes")}
        fixed = b["base_weight_bytes"] + b["lora_param_bytes"] + b["lora_grad_bytes"] + b["lora_teacher_bytes"]
        gib["fixed_adamw"] = (fixed + b["adamw_state_bytes"]) / 2**30
        gib["fixed_adamw8bit"] = (fixed + b["adamw8bit_state_bytes"]) / 2**30
        out[name] = {"counts": {k: v for k, v in b.items() if not k.endswith("_bytes")}, "gib": gib,
                     "gpu_target_gib": GPU_TARGET_GIB[name]}
    return {"computed_not_measured": True, "dtype": args.dtype, "rank": args.rank, "models": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["toy", "klein4b", "klein9b", "zimage"], default="toy")
    p.add_argument("--impl", choices=["auto", "own", "comfy"], default="auto",
                   help="real-shape models: ComfyUI's classes (comfy), bench/shapes.py (own), comfy when importable")
    p.add_argument("--depth", type=int, default=None, help="blocks of each kind at full width (default: the real count)")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (real-shape models)")
    p.add_argument("--text-tokens", type=int, default=256, help="caption tokens (real-shape models)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp8"], default="fp32",
                   help="base weights (fp8: stored e4m3, computed in bf16; LoRA bf16 unless fp32)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--states", choices=["all", "one"], default="all")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (TrainConfig.compile)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the pair of arm processes this many times")
    p.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--estimate", action="store_true", help="computed full-size byte counts only (meta device)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--arm", choices=["sft", "dopsd"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "toy":  # fixed by the toy model: 3x32x32, its own text encoder
        args.resolution, args.text_tokens, args.dtype, args.depth = 32, None, "fp32", None
    if args.estimate:
        report = estimate(args)
    elif args.arm:
        print(json.dumps(run_arm(args)))
        return
    else:
        runs = [run_pair(args) for _ in range(args.repeats)]
        keys = ("time_ratio", "memory_ratio", "bound_ratio")
        report = {k: statistics.median(r[k] for r in runs) for k in keys}
        mid = sorted(runs, key=lambda r: r["bound_ratio"])[len(runs) // 2]  # the median run, for the details
        report.update({k: v for k, v in mid.items() if k not in keys})
        report["one_state_vs_sft"] = report["time_ratio"] if args.states == "one" else None
        report["spread"] = {k: spread([r[k] for r in runs]) for k in keys}
        report["targets"] = verdict(report, args)
        report["all_targets_met"] = all(t["met"] for t in report["targets"].values())
        report["config"] = {k: v for k, v in vars(args).items() if k not in ("json", "arm", "estimate")}
        report["config"]["impl"] = ("toy" if args.model == "toy" else
                                    "comfy" if args.impl == "comfy" or (args.impl == "auto" and comfy_available())
                                    else "own")
        report["versions"] = versions(torch.device(args.device))
        report["device"] = args.device
    if args.json:
        print(json.dumps(report))
        return
    for k, v in report.items():
        if k == "targets":
            for name, t in v.items():
                print(f"target {name}: {t['value']:.3f} {t['target']}: {'met' if t['met'] else 'MISSED'}")
        else:
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()

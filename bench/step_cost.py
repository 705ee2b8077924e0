"""Cost of one D-OPSD step against one SFT step: same model, batch, resolution, LoRA.

    python bench/step_cost.py --json                 # toy model, K = 4, all states
    python bench/step_cost.py --k 8 --states one --json

time_ratio   = D-OPSD step / SFT step                         (medians, same process)
bound_ratio  = D-OPSD step / (K x teacher forward (teacher context, no grad)
                              + K x student forward+backward)  (primitives timed in the same process)
memory_ratio = D-OPSD peak / SFT peak; each arm runs in its own process (peak RSS on CPU,
               allocator peak on GPU), activation_share = (peak - after-setup) / peak
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_core.denoiser import Record  # noqa: E402
from dopsd_core.objectives import Batch  # noqa: E402
from dopsd_core.trainer import TrainConfig, Trainer  # noqa: E402


def build(args):
    if args.model != "toy":
        raise SystemExit(f"model {args.model!r}: only 'toy' is available without ComfyUI/GPU in this version")
    from dopsd_core.toy.denoiser import load_toy, ToyContext
    den = load_toy()
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(max(2, args.batch)):
        x0 = torch.rand(den.latent_shape, generator=g) * 2 - 1
        text = den.text_encoder.encode([f"a red [v{1 + i % 8}] on a black background"])
        records.append(Record(f"r{i}", x0, ["c"], [ToyContext(text)], [ToyContext(text, x0[None])]))
    return den, records


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(args) -> dict:
    """One method in this process: setup, warm-up, timed steps, primitives (D-OPSD arm only)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    den, records = build(args)
    cfg = TrainConfig(method=args.arm, steps=10**6, rank=args.rank, alpha=float(args.rank), lr=1e-4,
                      optimizer=args.optimizer, batch_size=args.batch, k=args.k, states=args.states,
                      checkpointing=args.checkpointing, seed=0)
    import tempfile
    trainer = Trainer(den, records, cfg, Path(tempfile.mkdtemp(prefix="dopsd-bench-")))
    after_setup = current_bytes(device)
    for _ in range(args.warmup):
        trainer.train_step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    out = {"arm": args.arm, "step_s": statistics.median(times), "peak_bytes": peak_bytes(device),
           "after_setup_bytes": after_setup}
    if args.arm == "dopsd":
        out.update(primitives(den, trainer, args))
    return out


def primitives(den, trainer, args) -> dict:
    """Median times of the two primitives a D-OPSD state costs, at the roll-out's first state."""
    lora = den.lora()
    batch = trainer._draw_batch()
    x = torch.randn(batch.x0.shape)
    s = torch.full((x.shape[0],), 1.0)

    def teacher():
        with torch.no_grad(), lora.use("teacher"):
            den.denoise(x, s, batch.teacher_ctx)

    def student():
        with lora.use("student"):
            den.denoise(x, s, batch.student_ctx).float().pow(2).mean().backward()

    res = {}
    for name, fn in (("teacher_fwd_s", teacher), ("student_fwd_bwd_s", student)):
        for _ in range(args.warmup):
            fn()
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts)
    trainer.opt.zero_grad(set_to_none=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--states", choices=["all", "one"], default="all")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--arm", choices=["sft", "dopsd"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return
    arms = {}
    for arm in ("sft", "dopsd"):
        cmd = [sys.executable, __file__, "--arm", arm] + [a for a in sys.argv[1:] if a != "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{arm} arm failed:\n{res.stderr}")
        arms[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    sft, dop = arms["sft"], arms["dopsd"]
    n_states = args.k if args.states == "all" else 1
    bound = n_states * (dop["teacher_fwd_s"] + dop["student_fwd_bwd_s"])
    report = {
        "time_ratio": dop["step_s"] / sft["step_s"],
        "memory_ratio": dop["peak_bytes"] / sft["peak_bytes"],
        "bound_ratio": dop["step_s"] / bound if args.states == "all" else None,
        "one_state_vs_sft": dop["step_s"] / sft["step_s"] if args.states == "one" else None,
        "activation_share": {a: (r["peak_bytes"] - r["after_setup_bytes"]) / r["peak_bytes"] for a, r in arms.items()},
        "sft_step_s": sft["step_s"], "dopsd_step_s": dop["step_s"], "bound_s": bound,
        "teacher_fwd_s": dop["teacher_fwd_s"], "student_fwd_bwd_s": dop["student_fwd_bwd_s"],
        "peak_mib": {a: r["peak_bytes"] / 2**20 for a, r in arms.items()},
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "arm")},
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()

"""What a training run costs on a GPU, before one is lent: model evaluations and FLOPs per step, and 1000 steps.

    python bench/run_cost.py                      # klein-4B at 1024², the settings below, a markdown table
    python bench/run_cost.py --model zimage --resolution 768 --json

A model evaluation is one sample's forward or backward (the toy study's unit). FLOPs are counted, not
estimated: torch.utils.flop_counter over the full-size same-shape models of bench/shapes.py on the meta
device (nothing is allocated), with the real token counts (bench/memory.py real_setup): the student's
forward, the teacher's (klein: the target as a reference latent, twice the image tokens; Z-Image: the
Qwen3-VL context), and the student's forward + backward with per-block checkpointing (the recompute is
counted; the base is frozen, so backward computes input gradients only).

A D-OPSD sample's roll-out supervises `states` of its K states (all, or one or two at random): each
supervised state costs a teacher forward, a student forward and a backward; each state the student only
steps through before the last supervised one costs a no-grad forward. SFT costs a forward and a backward
per sample. The prior adds prior_batch such samples per micro-batch on every prior_every-th step. SFT's
prior samples its class images once per run (K forwards each).

GPU-hours divide the FLOPs by an assumed sustained throughput (--tflops, default 400: an H100/H200 at
about 40 % of its 989 TFLOP/s dense bf16 peak). bench/gpu_table.py measures seconds per step when a GPU is
lent; until then these hours are a FLOP count over an assumption, not a measurement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from memory import real_setup  # noqa: E402

from dopsd_core.trainer import PRIOR_CLASS_IMAGES  # noqa: E402

# Per optimizer step, as TrainConfig fields. The families' defaults: 1 image x 4 accumulated micro-batches,
# one prior roll-out per micro-batch, K = 4, every state supervised, the prior on every step.
FAMILY = dict(batch_size=1, grad_accum=4, k=4, prior_batch=1)
RELEASED_ROW = "D-OPSD + prior, defaults (K = 4, all states)"  # the released recipe + the prior: every share's reference
SETTINGS = {
    RELEASED_ROW: dict(method="dopsd", states="all", prior_states="same", prior_every=1),
    "SFT + prior": dict(method="sft", prior_every=1),
    "D-OPSD + prior, one state, prior one state": dict(method="dopsd", states="one", prior_states="same", prior_every=1),
    "D-OPSD + prior, prior every 4": dict(method="dopsd", states="all", prior_states="same", prior_every=4),
    "D-OPSD + prior, one state, prior one state every 4": dict(method="dopsd", states="one", prior_states="same",
                                                               prior_every=4),
}


def spec_settings(spec) -> dict:
    """The settings rows of a family's defaults as its spec has them now (the table's last row when they
    differ from the released recipe's)."""
    return {"D-OPSD + prior, the family's defaults now (family_spec.py)":
            dict(method="dopsd", states=spec.states, prior_states=spec.prior_states, prior_every=spec.prior_every)}


def rollout(states: str, k: int) -> dict:
    """Expected passes of one sample's roll-out over the random choice of supervised states."""
    if states == "all":
        return {"teacher": k, "student_grad": k, "student_nograd": 0.0}
    n = {"one": 1, "two": 2}[states]
    picks = list(itertools.combinations(range(k), n))
    prefix = sum(max(p) + 1 - n for p in picks) / len(picks)
    return {"teacher": n, "student_grad": n, "student_nograd": prefix}


def passes_per_step(method: str, k: int, batch_size: int, grad_accum: int, prior_batch: int, states: str = "all",
                    prior_states: str = "same", prior_every: int = 1, prior: bool = True) -> dict:
    """Expected teacher forwards, student forward+backwards and no-grad student forwards per optimizer step,
    and the model evaluations they make (3 per supervised state, 1 per no-grad forward, 2 per SFT sample)."""
    samples = batch_size * grad_accum
    prior_samples = prior_batch * grad_accum / prior_every if prior else 0.0
    if method == "sft":
        p = {"teacher": 0.0, "student_grad": samples + prior_samples, "student_nograd": 0.0}
        return {**p, "evals": 2 * p["student_grad"]}
    concept = rollout(states, k)
    pri = rollout(states if prior_states == "same" else prior_states, k)
    p = {key: samples * concept[key] + prior_samples * pri[key] for key in concept}
    return {**p, "evals": 3 * p["student_grad"] + p["student_nograd"]}


def flops(model: str, resolution: int) -> dict:
    """TFLOPs of one sample: student forward, teacher forward, student forward + checkpointed backward."""
    setup = real_setup(model, resolution, "dopsd", dict(checkpointing=True, optimizer="adamw8bit", rank=16), "bf16")
    s = shapes.SPECS[model]
    m = shapes.build_model(model, "bf16", device="meta")
    side = resolution // (s.downsample)
    x = torch.empty(1, s.latent_channels, side, side, device="meta", dtype=torch.bfloat16)
    sigma = torch.ones(1, device="meta")
    text = torch.empty(1, setup.text, s.context_dim, device="meta", dtype=torch.bfloat16)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e12

    if s.kind == "flux2":  # caption + the released suffix, and the target as a reference latent
        teacher = dict(text=torch.empty(1, setup.teacher_text, s.context_dim, device="meta", dtype=torch.bfloat16), ref=x)
    else:  # the Qwen3-VL context in place of the caption
        teacher = dict(text=torch.empty(1, setup.teacher_text, s.context_dim, device="meta", dtype=torch.bfloat16))
    student_fwd = count(lambda: m(x, sigma, text))
    teacher_fwd = count(lambda: m(x, sigma, **teacher))
    m.checkpointing = True

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        m(xg, sigma, text).sum().backward()
    return {"student_fwd": student_fwd, "teacher_fwd": teacher_fwd, "student_fwd_bwd": count(fwd_bwd),
            "tokens": {"image": side * side // (s.patch ** 2), "text": setup.text, "teacher_text": setup.teacher_text}}


def cost_table(model: str = "klein4b", resolution: int = 1024, steps: int = 1000, tflops: float = 400.0,
               settings: dict = SETTINGS, family: dict = FAMILY) -> dict:
    f = flops(model, resolution)
    rows = []
    for name, setting in settings.items():
        p = passes_per_step(**{**family, **setting})
        tf_step = p["teacher"] * f["teacher_fwd"] + p["student_grad"] * f["student_fwd_bwd"] + p["student_nograd"] * f["student_fwd"]
        setup = PRIOR_CLASS_IMAGES * family["k"] * f["student_fwd"] if setting["method"] == "sft" else 0.0
        total = steps * tf_step + setup
        rows.append({"setting": name, **setting, "evals_per_step": p["evals"], "passes_per_step": p,
                     "tflop_per_step": tf_step, "evals": steps * p["evals"], "pflop": total / 1e3,
                     "gpu_hours": total / tflops / 3600})
    ref = rows[0]
    for r in rows:
        r["share_of_defaults"] = r["pflop"] / ref["pflop"]
    return {"model": model, "resolution": resolution, "steps": steps, "assumed_sustained_tflops": tflops,
            "family": family, "tflop_per_sample": f, "rows": rows}


def markdown(t: dict) -> str:
    f = t["tflop_per_sample"]
    lines = [f"{t['model']} at {t['resolution']}² ({f['tokens']['image']} image tokens): one sample's student forward "
             f"{f['student_fwd']:.1f} TFLOP, teacher forward {f['teacher_fwd']:.1f}, student forward + checkpointed "
             f"backward {f['student_fwd_bwd']:.1f}. {t['steps']} steps of 1 image x 4 micro-batches; GPU-hours at an "
             f"assumed {t['assumed_sustained_tflops']:g} TFLOP/s sustained.", "",
             "| setting | model evaluations / step | TFLOP / step | evaluations, "
             f"{t['steps']} steps | PFLOP | GPU-hours | share of D-OPSD defaults |", "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        lines.append(f"| {r['setting']} | {r['evals_per_step']:g} | {r['tflop_per_step']:,.0f} | {r['evals']:,.0f} | "
                     f"{r['pflop']:,.0f} | {r['gpu_hours']:.1f} | {r['share_of_defaults']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(shapes.SPECS), default="klein4b")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed sustained TFLOP/s of the GPU")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    from dopsd_core.family_spec import FLUX2_KLEIN, Z_IMAGE
    spec = Z_IMAGE if a.model == "zimage" else FLUX2_KLEIN
    now = spec_settings(spec)
    settings = {**SETTINGS, **{k: v for k, v in now.items() if v != SETTINGS[RELEASED_ROW]}}
    t = cost_table(a.model, a.resolution, a.steps, a.tflops, settings=settings)
    if a.out:
        from dopsd_core.fileio import save_json
        save_json(t, a.out)
    print(json.dumps(t) if a.json else markdown(t), end="" if not a.json else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Probe: does the star need more adapter capacity, more concept samples per prior sample, or a larger lr?

D-OPSD + prior (or SFT + prior: method=sft) at the earlier defaults (MAIN_BUDGET) with overrides (rank R, which sets alpha R
too; the concept batch; the steps; the lr; the lr schedule), evaluated like the study's checkpoints every 50 steps to step
200, then every 100.

usage: python experiments/toy/probes/capacity.py OUT_DIR KEY=VALUE... [concept=C] [seed=S] [method=sft]
         e.g. rank=64, batch_size=8, rank=64 steps=400, lr=0.003, rank=64 lr=0.003 steps=400 schedule=cosine
Writes capacity_<concept>_[sft_]<overrides>_s<seed>.json here (with the base fingerprint inside).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import MAIN_BUDGET
from probe_eval import evaluate_checkpoints

torch.set_num_threads(1)
out = Path(sys.argv[1])
overrides = {k: v for k, v in (a.split("=") for a in sys.argv[2:])}
concept, seed = overrides.pop("concept", "star"), int(overrides.pop("seed", 0))
method = overrides.pop("method", "dopsd")
overrides = {k: float(v) if k == "lr" else v if k == "schedule" else int(v) for k, v in overrides.items()}
label = ("sft_" if method == "sft" else "") + "_".join(f"{k}{v}" for k, v in overrides.items())
if "rank" in overrides:
    overrides["alpha"] = float(overrides["rank"])
steps = overrides.setdefault("steps", 200)
run = out / f"{concept}_{label}_s{seed}"
train_concept(concept, method, run, out, seed=seed, save_every=50, prior_prompts=auto_prior(concept, out),
              **TOY_PRIOR, **{**MAIN_BUDGET, **overrides})
fingerprint, points = evaluate_checkpoints(run, concept, [s for s in (50, 100, 200, 300, 400, 600, 800) if s <= steps])
(Path(__file__).parent / f"capacity_{concept}_{label}_s{seed}.json").write_text(json.dumps(
    {"concept": concept, "method": method, "seed": seed, "override": overrides, "base": fingerprint, "points": points}, indent=1))

"""Probe (one seed, star): what the on-policy prior (D-OPSD) and DreamBooth's prior (SFT) do to fidelity,
leak, cross-token and retention on the shipped toy base. Indicative only: one training seed.

usage: python experiments/toy/probes/prior_probe.py OUT_DIR NAME METHOD LR STEPS PRIOR_WEIGHT PRIOR_BATCH
"""
import json
import sys
import time
from pathlib import Path

import torch

from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import ToyMetrics, concept_training_set
from dopsd_core.toy.runs import auto_prior, train_concept

out, name, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lr, steps, weight, batch = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(2)
out.mkdir(parents=True, exist_ok=True)
prompts = auto_prior("star", out) if weight else None
t0 = time.time()
den = train_concept("star", method, out / f"run_{name}", out, seed=0, lr=lr, steps=steps, prior_weight=weight,
                    prior_batch=batch, prior_prompts=prompts)
train_s = time.time() - t0
m = ToyMetrics(load_evaluator(), load_toy_file(BASE_WEIGHTS))
r = m.evaluate(den, "star", [caps[0] for caps in concept_training_set("star")[1]])
res = {"name": name, "method": method, "lr": lr, "steps": steps, "prior_weight": weight, "prior_batch": batch,
       "prior_prompts": len(prompts or []), "train_seconds": round(train_s, 1),
       **{k: v for k, v in r.items() if k != "hits"}}
print(json.dumps(res), flush=True)
(out / f"{name}.json").write_text(json.dumps(res, indent=1))

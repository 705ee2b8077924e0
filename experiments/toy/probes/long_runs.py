"""Probe (seed 0, one concept per call): does D-OPSD + prior at the study's defaults (lr 1e-3, lambda 1,
4 prior samples per step) move along the front after step 200, where every study run stopped? Trains 400
steps and evaluates steps 300 and 400 exactly as the study evaluates its checkpoints (toy/study.py:
StudyMetrics.checkpoint), so the points compare with the study's run of the same concept and seed.

usage: python experiments/toy/probes/long_runs.py OUT_DIR CONCEPT [SEED]
Writes long_<concept>_s<seed>_<base fingerprint>.json here (run 8's results, from before the fingerprint
was part of the name, are long_<concept>_s0.json).
"""
import json
import sys
from pathlib import Path

import torch

from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import concept_training_set
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, load_with_lora, train_concept
from dopsd_core.toy.study import N_UNRELATED, StudyMetrics

out, concept = Path(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
torch.set_num_threads(1)
run = out / f"{concept}_dopsd_prior_lr0.001_s{seed}_400"
train_concept(concept, "dopsd", run, out, seed=seed, lr=1e-3, steps=400, save_every=100,
              prior_prompts=auto_prior(concept, out), **TOY_PRIOR)
base = load_toy_file(BASE_WEIGHTS)
metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
captions = [caps[0] for caps in concept_training_set(concept)[1]]
points = []
for step in (300, 400):
    p = metrics.checkpoint(load_with_lora(run / f"lora-{step:06d}.safetensors"), concept, captions)
    points.append({"step": step, **{k: v for k, v in p.items() if k != "hits"}})
    print(json.dumps(points[-1]), flush=True)
name = f"long_{concept}_s{seed}_{base.fingerprint()}.json"
(Path(__file__).parent / name).write_text(json.dumps({"concept": concept, "seed": seed, "base": base.fingerprint(),
                                                      "points": points}, indent=1))

"""Probe (seed 0, one concept per call): does D-OPSD + prior at the study's defaults (lr 1e-3, lambda 1,
4 prior samples per step) move along the front after step 200, where every study run stopped? Trains 400
steps and evaluates steps 300 and 400 exactly as the study evaluates its checkpoints (experiments/toy/lab/study.py:
StudyMetrics.checkpoint), so the points compare with the study's run of the same concept and seed.

usage: python experiments/toy/probes/long_runs.py OUT_DIR CONCEPT [SEED]
Writes long_<concept>_s<seed>_<base fingerprint>.json here (run 8's results, from before the fingerprint
was part of the name, are long_<concept>_s0.json).
"""
import json
import sys
from pathlib import Path

import torch

from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from probe_eval import evaluate_checkpoints

out, concept = Path(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
torch.set_num_threads(1)
run = out / f"{concept}_dopsd_prior_lr0.001_s{seed}_400"
train_concept(concept, "dopsd", run, out, seed=seed, lr=1e-3, steps=400, save_every=100,
              prior_prompts=auto_prior(concept, out), **TOY_PRIOR)
fingerprint, points = evaluate_checkpoints(run, concept, (300, 400))
name = f"long_{concept}_s{seed}_{fingerprint}.json"
(Path(__file__).parent / name).write_text(json.dumps({"concept": concept, "seed": seed, "base": fingerprint,
                                                      "points": points}, indent=1))

"""Probe (seed 0): fresh norm-matched embedding rows for [V1] [V2] [V3] (as token_reroll.py) *with* the
default prior (D-OPSD + auto prior, lambda 1, lr 1e-3, 200 steps): does a token the base can tell apart
from the prior's [V4]..[V8] let the concept be learned without crossing to [V2]/[V3]?

usage: python experiments/toy/probes/reroll_prior.py OUT_DIR CONCEPT reroll|orig [auto|generic]
(generic: the auto prior without the trigger-removed captions)
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.data import load_image_folder
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import concept_training_set
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import MAIN_BUDGET, load_with_lora
from experiments.toy.lab.study import N_UNRELATED, StudyMetrics
from dopsd_core.toy.render import CONCEPT_TOKEN
from reroll import rerolled_base

out, concept, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
prior_mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
out.mkdir(parents=True, exist_ok=True)
base_path = BASE_WEIGHTS
if mode == "reroll":
    base_path = rerolled_base(out)
run = out / f"{concept}_{mode}_{prior_mode}"
prior = auto_prior(concept, out)
if prior_mode == "generic":
    removed = {" ".join(c.replace(CONCEPT_TOKEN[concept], "").split())
               for item in load_image_folder(out / "data" / concept, 32) for c in item.captions}
    prior = [p for p in prior if p not in removed]
print(len(prior), "prior prompts", flush=True)
train_concept(concept, "dopsd", run, out, seed=0, base=base_path, prior_prompts=prior, **TOY_PRIOR, **MAIN_BUDGET)
base = load_toy_file(base_path)
metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
imgs, caps = concept_training_set(concept)
p = metrics.checkpoint(load_with_lora(run / "lora.safetensors", base_path), concept, [c[0] for c in caps])
p = {k: v for k, v in p.items() if k != "hits"}
p["teacher"] = metrics.teacher_fidelity(base, concept, imgs, caps)
print(json.dumps(p), flush=True)
(Path(__file__).parent / f"reroll_prior_{mode}_{prior_mode}_{concept}.json").write_text(json.dumps(p, indent=1))

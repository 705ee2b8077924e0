"""Probe on a candidate toy base: does a concept LoRA stay on its own
token? Trains one D-OPSD LoRA at the toy defaults of the time (MAIN_BUDGET; prior `auto` or `none`), evaluates its
steps 80, 140 and 200 like the study's checkpoints (fidelity 96 samples, retention and leak on 192
unrelated prompts, cross_token on 48 [other token] prompts) and adds the teacher's fidelity and the
tokens' identity (metrics.token_identity: each token's prompts drawn with its own outline).

usage: python experiments/toy/probes/token_acceptance.py BASE.safetensors OUT_DIR CONCEPT auto|none [SEED]
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.toy.denoiser import load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import concept_training_set, token_identity
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import MAIN_BUDGET, load_with_lora
from experiments.toy.lab.study import N_UNRELATED, StudyMetrics

base_path, out, concept, prior = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
run = out / f"{concept}_{prior}_s{seed}"
kwargs = dict(prior_prompts=auto_prior(concept, out), **TOY_PRIOR) if prior == "auto" else {}
train_concept(concept, "dopsd", run, out, seed=seed, base=base_path, save_every=20, **MAIN_BUDGET, **kwargs)
base = load_toy_file(base_path)
metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
images, captions = concept_training_set(concept)
result = {"base": str(base_path), "fingerprint": base.fingerprint(), "concept": concept, "prior": prior,
          "seed": seed, "teacher": metrics.teacher_fidelity(base, concept, images, captions),
          "base_token_identity": token_identity(base), "points": []}
for step in (80, 140, 200):
    tuned = load_with_lora(run / f"lora-{step:06d}.safetensors", base_path)
    p = {k: v for k, v in metrics.checkpoint(tuned, concept, [c[0] for c in captions]).items() if k != "hits"}
    p["token_identity"] = token_identity(tuned)
    result["points"].append({"step": step, **p})
    print(json.dumps(result["points"][-1]), flush=True)
(out / f"token_acceptance_{concept}_{prior}_s{seed}.json").write_text(json.dumps(result, indent=1))

"""Probe for the equal-compute comparison: D-OPSD + prior supervising one random roll-out state per step
(`--states one`) instead of all K = 4. Its step costs about 4.5 model evaluations per sample (on average
1.5 no-grad prefix forwards, a teacher forward, a student forward and a backward) against all-states'
12, so within an SFT + prior run's evaluations it gets about 100 steps instead of 38. Trains the star,
the heart or the crescent at the study's D-OPSD + prior setting (lr 1e-3, lambda 1, seed 0), evaluates
the study's checkpoints like the study, and compares at retention tau with the study's seed-0 runs:
SFT + prior within its own 200 steps' evaluations, and all-states D-OPSD + prior.

usage: python experiments/toy/probes/one_state.py OUT_DIR STUDY_DIR CONCEPT
(trains in OUT_DIR/one_state_<concept>_s0; writes one_state_<concept>_s0.json here)
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import concept_training_set
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import load_with_lora
from experiments.toy.lab.study import CHECKPOINTS, N_UNRELATED, TAUS, StudyMetrics, evals_per_step, matched

out, study, concept = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
EVALS_PER_STEP = evals_per_step("dopsd", True, states="one")
run = out / f"one_state_{concept}_s0"
if not (run / f"lora-{CHECKPOINTS[-1]:06d}.safetensors").is_file():
    train_concept(concept, "dopsd", run, study, seed=0, lr=1e-3, steps=CHECKPOINTS[-1], save_every=CHECKPOINTS[0],
                  states="one", prior_prompts=auto_prior(concept, study), **TOY_PRIOR)
base = load_toy_file(BASE_WEIGHTS)
metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
captions = [caps[0] for caps in concept_training_set(concept)[1]]
points = []
for step in CHECKPOINTS:
    p = metrics.checkpoint(load_with_lora(run / f"lora-{step:06d}.safetensors"), concept, captions)
    points.append({"step": step, "model_evals": step * EVALS_PER_STEP, **p})
    print(step, {k: round(p[k], 3) for k in ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")},
          flush=True)
sft = json.loads((study / "runs" / f"{concept}_sft_prior_lr0.001_r16_s0" / "result.json").read_text())
allk = json.loads((study / "runs" / f"{concept}_dopsd_prior_lr0.001_r16_s0" / "result.json").read_text())
budget = sft["setup_evals"] + CHECKPOINTS[-1] * sft["evals_per_step"]


def at(ps, tau, max_evals=None):
    m = matched(ps, tau, max_evals)
    return None if m is None else {k: m[k] for k in ("step", "model_evals", "concept_fidelity", "retention", "leak")}


compare = {str(tau): {"one_state_equal_compute": at(points, tau, budget), "one_state": at(points, tau),
                      "sft_prior": at(sft["points"], tau), "all_states_equal_compute": at(allk["points"], tau, budget),
                      "all_states": at(allk["points"], tau)} for tau in TAUS}
print(json.dumps(compare, indent=1))
result = {"concept": concept, "seed": 0, "base": base.fingerprint(), "evals_per_step": EVALS_PER_STEP,
          "sft_budget": budget, "points": [{k: v for k, v in p.items() if k != "hits"} for p in points], "compare": compare}
(Path(__file__).parent / f"one_state_{concept}_s0.json").write_text(json.dumps(result, indent=1))

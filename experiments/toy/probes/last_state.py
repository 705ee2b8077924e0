"""Probe: is it the prior at the roll-out's last state (sigma .5) that keeps the student from drawing the star?

D-OPSD + prior at the earlier defaults (MAIN_BUDGET), except that the prior's roll-outs stop one state early: they supervise
sigma 1, .9 and .75 and leave the last state (.5, whose x0 is the sample) to the concept loss alone.
Optionally on the one-pose data of pose.py. Evaluated like the study's checkpoints.

usage: python experiments/toy/probes/last_state.py OUT_DIR CONCEPT [SEED] [onepose]
Writes last_state_<concept>[_onepose]_s<seed>.json here (with the base fingerprint inside).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
import dopsd_core.trainer as trainer
from dopsd_core.toy.render import CONCEPT_TOKEN, caption_variants, concept_scenes
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import MAIN_BUDGET
from probe_eval import evaluate_checkpoints

HERE = Path(__file__).parent
torch.set_num_threads(1)
full_backward = trainer.dopsd_backward


def prior_without_last_state(denoiser, batch, sigmas, generator, *, teacher="ema", **kw):
    if teacher == "start":  # the prior's roll-out: drop the last state (sigmas[:-1] ends at the last state's sigma)
        sigmas = sigmas[:-1]
    return full_backward(denoiser, batch, sigmas, generator, teacher=teacher, **kw)


trainer.dopsd_backward = prior_without_last_state

out, concept = Path(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
onepose = len(sys.argv) > 4 and sys.argv[4] == "onepose"
captions = None  # the concept's own training captions
if onepose:
    from pose import one_pose, write_data
    write_data(out, concept)
    captions = [caption_variants(one_pose(s), CONCEPT_TOKEN[concept])[0] for s in concept_scenes(concept)]
name = f"last_state_{concept}{'_onepose' if onepose else ''}_s{seed}"
run = out / name
train_concept(concept, "dopsd", run, out, seed=seed, save_every=50, prior_prompts=auto_prior(concept, out), **TOY_PRIOR, **MAIN_BUDGET)
fingerprint, points = evaluate_checkpoints(run, concept, (50, 100, 200), captions)
(HERE / f"{name}.json").write_text(json.dumps({"concept": concept, "seed": seed, "onepose": onepose,
                                               "base": fingerprint, "points": points}, indent=1))

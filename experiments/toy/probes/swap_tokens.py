"""Probe: is the star hard to teach, or is its token hard to re-teach?

The star's token `[V1]` already draws an outline on the base that is close to a star (pixel MSE 0.021 on the
star's scenes; `[V3]`'s outline is 0.036 away, farther than the heart's own token outline from the heart,
0.031). Here two concepts swap tokens (the shared CONCEPT_TOKEN table is changed for this process, so the
data's captions, the auto prior, the trigger and the evaluation prompts all follow) and one of them is
trained with D-OPSD + prior at the earlier defaults (MAIN_BUDGET), evaluated like the study's checkpoints.

usage: python experiments/toy/probes/swap_tokens.py OUT_DIR CONCEPT OTHER [SEED]
         trains CONCEPT under OTHER's token (and OTHER under CONCEPT's in the table)
Writes swap_<concept>_as_<token>_s<seed>.json here (with the base fingerprint inside).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.toy.metrics import concept_training_set
from dopsd_core.toy.render import CONCEPT_TOKEN
from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
from experiments.toy.lab.runs import MAIN_BUDGET
from probe_eval import evaluate_checkpoints

torch.set_num_threads(1)
out, concept, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
CONCEPT_TOKEN[concept], CONCEPT_TOKEN[other] = CONCEPT_TOKEN[other], CONCEPT_TOKEN[concept]
token = CONCEPT_TOKEN[concept]
run = out / f"{concept}_as_{token.strip('[]')}_s{seed}"
train_concept(concept, "dopsd", run, out, seed=seed, save_every=50, prior_prompts=auto_prior(concept, out), **TOY_PRIOR, **MAIN_BUDGET)
assert token in concept_training_set(concept)[1][0][0]  # the evaluation prompts follow the swap too
fingerprint, points = evaluate_checkpoints(run, concept, (50, 100, 200))
name = f"swap_{concept}_as_{token.strip('[]')}_s{seed}.json"
(Path(__file__).parent / name).write_text(json.dumps({"concept": concept, "token": token, "seed": seed,
                                                      "base": fingerprint, "points": points}, indent=1))

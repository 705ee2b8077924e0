"""Probe: is the star lost in the student's last step, and does weighting the roll-out's states fix it?

`targets`: along the student's own 4-step roll-out (sigma 1, .9, .75, .5), the share of the student's, of
the teacher's (the same caption plus the target in context) and of the base's (text only) x0 predictions
that the evaluator calls the concept. The last state's x0 is the sample, so a student that has the shape at sigma .75 and loses it at
.5, where its teacher still draws it, fails to fit that state's target.

`train`: D-OPSD + prior at the earlier defaults (MAIN_BUDGET) with another loss weight (x0: every state alike, the default;
velocity: x0 error / sigma^2; transition: (dsigma / sigma)^2, the error of the next state, which puts
nearly all the weight on the last one), evaluated like the study's checkpoints.

usage: python experiments/toy/probes/state_weights.py targets CONCEPT LORA [LABEL]
       python experiments/toy/probes/state_weights.py train OUT_DIR CONCEPT WEIGHT [SEED]
Writes state_targets_<concept>_<label>.json / state_weights_<concept>_<weight>_s<seed>.json here
(with the base fingerprint inside).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.denoiser import euler_step
from dopsd_core.toy.denoiser import BASE_WEIGHTS, latent_to_image, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from probe_eval import evaluate_checkpoints, training_contexts

HERE = Path(__file__).parent
torch.set_num_threads(1)


@torch.no_grad()
def targets(concept: str, lora: Path, seeds: int = 8) -> dict:
    from experiments.toy.lab.runs import load_with_lora
    ev, base, student = load_evaluator(), load_toy_file(BASE_WEIGHTS), load_with_lora(lora)
    sigmas = base.sigma_grid(4)
    text_only, in_context = training_contexts(base, concept, seeds)
    x = torch.randn((len(in_context.ref), *base.latent_shape), generator=torch.Generator().manual_seed(0))

    def share(x0):
        return sum(s == concept for s in ev.classify(latent_to_image(x0))[0]) / len(x0)

    states = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((len(x),), sigma)
        x0_student, x0_teacher = student.denoise(x, s, text_only), base.denoise(x, s, in_context)
        x0_base = base.denoise(x, s, text_only)  # what the LoRA changes at this state
        states.append({"sigma": sigma, "student": share(x0_student), "teacher": share(x0_teacher),
                       "base": share(x0_base), "x0_mse": ((x0_student - x0_teacher) ** 2).mean().item(),
                       "lora_change": ((x0_student - x0_base) ** 2).mean().item()})
        print(json.dumps(states[-1]), flush=True)
        x = euler_step(x, x0_student, sigma, sigma_next)
    return {"concept": concept, "lora": str(lora), "base": base.fingerprint(), "samples": len(x),
            "states": states}


def train(out: Path, concept: str, weight: str, seed: int) -> dict:
    from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
    from experiments.toy.lab.runs import MAIN_BUDGET
    run = out / f"{concept}_dopsd_prior_{weight}_s{seed}"
    train_concept(concept, "dopsd", run, out, seed=seed, save_every=50, loss_weight=weight,
                  prior_prompts=auto_prior(concept, out), **TOY_PRIOR, **MAIN_BUDGET)
    fingerprint, points = evaluate_checkpoints(run, concept, (50, 100, 200))
    return {"concept": concept, "seed": seed, "loss_weight": weight, "base": fingerprint, "points": points}


if __name__ == "__main__":
    if sys.argv[1] == "targets":
        concept, lora = sys.argv[2], Path(sys.argv[3])
        label = sys.argv[4] if len(sys.argv) > 4 else lora.parent.parent.name
        (HERE / f"state_targets_{concept}_{label}.json").write_text(json.dumps(targets(concept, lora), indent=1))
    else:
        out, concept, weight = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
        seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        r = train(out, concept, weight, seed)
        (HERE / f"state_weights_{concept}_{weight}_s{seed}.json").write_text(json.dumps(r, indent=1))

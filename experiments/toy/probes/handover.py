"""Probe: where along the student's own 4-step roll-out does the teacher stop drawing the concept?

The student (the base, text only: the training caption) samples its 4-step trajectory; after k of its
steps the teacher (the same caption plus the target image in context) takes over and finishes it. k = 0 is
the teacher's own sample (teacher fidelity); k = 4 is the student's. D-OPSD's targets at the student's
state after k steps are the teacher's x0 there, so where the share falls tells which states' targets
still carry the concept.

usage: python experiments/toy/probes/handover.py [SEEDS]   (writes handover_<base fingerprint>.json here)
"""
import json
import sys
from pathlib import Path

import torch

from dopsd_core.denoiser import euler_step
from dopsd_core.toy.denoiser import BASE_WEIGHTS, latent_to_image, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.render import HELD_OUT_SHAPES
from probe_eval import training_contexts

seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.set_num_threads(1)
den, ev = load_toy_file(BASE_WEIGHTS), load_evaluator()
sigmas = den.sigma_grid(4)
result = {"base": den.fingerprint(), "sigmas": sigmas, "seeds": seeds, "concepts": {}}
with torch.no_grad():
    for concept in HELD_OUT_SHAPES:
        student, teacher = training_contexts(den, concept, seeds)
        noise = torch.randn((len(teacher.ref), *den.latent_shape), generator=torch.Generator().manual_seed(0))
        shares = []
        for k in range(len(sigmas)):
            x = noise.clone()
            for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
                ctx = student if i < k else teacher
                x = euler_step(x, den.denoise(x, torch.full((len(x),), s), ctx), s, s_next)
            shapes, _ = ev.classify(latent_to_image(x))
            shares.append(sum(sh == concept for sh in shapes) / len(shapes))
        result["concepts"][concept] = {f"teacher after {k} student steps": v for k, v in enumerate(shares)}
        print(concept, [round(v, 2) for v in shares], flush=True)
(Path(__file__).parent / f"handover_{den.fingerprint()}.json").write_text(json.dumps(result, indent=1))

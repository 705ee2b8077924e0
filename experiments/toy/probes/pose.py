"""Probe: does the in-context teacher impose its reference's pose, and does that blur what the student learns?

The default star LoRAs draw soft blobs where their teacher draws sharp stars. The student sees the caption
only, so it cannot know the pose (angle, centre, radius) of the reference its teacher copies; if the
teacher's x0 targets follow the reference's pose rather than the student's state, the x0-MSE optimum is
the mean over the training images' poses, and a star averaged over a few pixels of shift and rotation is a
blob (a heart or a crescent averaged the same way keeps its outline).

usage: python experiments/toy/probes/pose.py follow
         teacher finishing the base student's roll-out after k steps, given the true reference or the
         same scene in another pose: which pose does its sample take? (pose_follow_<base>.json)
       python experiments/toy/probes/pose.py train OUT_DIR CONCEPT [SEED]
         D-OPSD + prior at the earlier defaults (MAIN_BUDGET) on the concept's 6 training scenes re-rendered in one pose
         (centred, radius 9.25, angle 0; colours, backgrounds and captions as before), evaluated like
         the study's checkpoints (pose_train_<concept>_s<seed>_<base>.json)
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.denoiser import euler_step
from dopsd_core.fileio import save_bytes
from dopsd_core.plot import save_png, to_pil
from dopsd_core.toy.denoiser import BASE_WEIGHTS, ToyContext, image_to_latent, latent_to_image, load_toy_file
from dopsd_core.toy.render import CONCEPT_TOKEN, HELD_OUT_SHAPES, SIZE, caption_variants, concept_scenes, render

HERE = Path(__file__).parent
torch.set_num_threads(1)


def one_pose(scene):
    return dataclasses.replace(scene, cx=SIZE / 2, cy=SIZE / 2, radius=9.25, angle=0.0)


def other_pose(scene):
    """The same scene moved and turned about as far as the training layouts allow."""
    return dataclasses.replace(scene, cx=SIZE - scene.cx, cy=SIZE - scene.cy, angle=-scene.angle,
                               radius=18.5 - scene.radius)


@torch.no_grad()
def follow(seeds: int = 4) -> dict:
    den = load_toy_file(BASE_WEIGHTS)
    sigmas = den.sigma_grid(4)
    result = {"base": den.fingerprint(), "sigmas": sigmas, "concepts": {}}
    for concept in HELD_OUT_SHAPES:
        scenes = concept_scenes(concept)
        own = torch.stack([render(s) for s in scenes for _ in range(seeds)])
        alt = torch.stack([render(other_pose(s)) for s in scenes for _ in range(seeds)])
        prompts = [caption_variants(s, CONCEPT_TOKEN[concept])[0] for s in scenes for _ in range(seeds)]
        texts = den.text_encoder.encode(prompts)
        noise = torch.randn((len(prompts), *den.latent_shape), generator=torch.Generator().manual_seed(0))
        rows = {}
        for k in range(len(sigmas) - 1):
            for ref_name, ref in (("own", own), ("other", alt)):
                x = noise.clone()
                refs = torch.stack([image_to_latent(img) for img in ref])
                for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
                    ctx = ToyContext(texts, None if i < k else refs)
                    x = euler_step(x, den.denoise(x, torch.full((len(x),), s), ctx), s, s_next)
                img = latent_to_image(x)
                # which of the two poses the finished sample is nearer (pixel MSE)
                d_own = ((img - own) ** 2).mean((1, 2, 3))
                d_alt = ((img - alt) ** 2).mean((1, 2, 3))
                nearer = d_own < d_alt if ref_name == "own" else d_alt < d_own
                rows[f"after {k} student steps, given the {ref_name} pose"] = round(nearer.float().mean().item(), 3)
        result["concepts"][concept] = rows
        print(concept, rows, flush=True)
    return result


def write_data(out: Path, concept: str) -> list:
    """The concept's training scenes in one pose, where train_concept looks for its data (written first, so
    it is not exported again)."""
    folder = out / "data" / concept
    scenes = [one_pose(s) for s in concept_scenes(concept)]
    for i, sc in enumerate(scenes):
        save_png(to_pil(render(sc).permute(1, 2, 0)), folder / f"{concept}_{i:02d}.png")
        save_bytes(("\n".join(caption_variants(sc, CONCEPT_TOKEN[concept])) + "\n").encode(), folder / f"{concept}_{i:02d}.txt")
    return scenes


def train(out: Path, concept: str, seed: int) -> dict:
    from dopsd_core.toy.runs import TOY_PRIOR, auto_prior, train_concept
    from experiments.toy.lab.runs import MAIN_BUDGET
    from probe_eval import evaluate_checkpoints
    scenes = write_data(out, concept)
    run = out / f"{concept}_onepose_s{seed}"
    train_concept(concept, "dopsd", run, out, seed=seed, save_every=100, prior_prompts=auto_prior(concept, out),
                  **TOY_PRIOR, **MAIN_BUDGET)
    captions = [caption_variants(s, CONCEPT_TOKEN[concept])[0] for s in scenes]
    fingerprint, points = evaluate_checkpoints(run, concept, (100, 200), captions)
    return {"concept": concept, "seed": seed, "base": fingerprint, "points": points}


if __name__ == "__main__":
    if sys.argv[1] == "follow":
        r = follow()
        (HERE / f"pose_follow_{r['base']}.json").write_text(json.dumps(r, indent=1))
    else:
        out, concept = Path(sys.argv[2]), sys.argv[3]
        seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        r = train(out, concept, seed)
        (HERE / f"pose_train_{concept}_s{seed}_{r['base']}.json").write_text(json.dumps(r, indent=1))

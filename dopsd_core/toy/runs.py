"""Training and evaluating LoRAs on the toy world: `dopsd demo`, and the lab's runs (experiments/toy/lab)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import load_image_folder
from ..denoiser import sample
from ..family_spec import TOY
from ..fileio import save_json
from ..lora import read_lora_file
from ..plot import image_grid, save_png
from ..prior import Prior
from ..trainer import Callbacks, TrainConfig, Trainer
from .denoiser import BASE_WEIGHTS, ToyDenoiser, latent_to_image, load_toy_file
from .evaluator import WEIGHTS as EVALUATOR_WEIGHTS, load_evaluator
from .metrics import ToyMetrics
from .render import CONCEPT_TOKEN, export_concept_folder

# The toy's default budget (read from its family spec), D-OPSD and SFT alike (equal steps, lr, rank, batch,
# data), with the prior below.
# From the trade-off study's levers stage (experiments/toy/study, "Cost levers"): D-OPSD + prior at rank 64,
# lr 2e-3 is the cheapest setting found that meets every aim, each concept included, at step 400 (fidelity
# 93 %, the star 84 %, retention 88 %, leak 2 %, mean of 3 concepts x 3 seeds); every cut of the prior or of
# the supervised states cost the star.
TOY_BUDGET = dict(steps=TOY.steps, rank=TOY.rank, alpha=TOY.alpha, lr=TOY.lr, batch_size=TOY.batch_size,
                  states=TOY.states)
TOY_PRIOR = dict(prior_weight=TOY.prior_weight, prior_batch=TOY.prior_batch, prior_every=TOY.prior_every,
                 prior_states=TOY.prior_states)  # with the `auto` prompts
# `dopsd demo` trains the toy's defaults for this many steps: all of them while that stays under 5 minutes
# on 2 cores (the defaults' 400 steps at rank 64: 3 min 57 s, docs/logs/demo_time.txt); else the fewest
# steps of the same setting that meet the study's mean aims, and the README says what the rest adds.
DEMO_STEPS = TOY.steps


def concept_data(shape: str, root: Path) -> Path:
    folder = Path(root) / "data" / shape
    if not any(folder.glob("*.png")):
        export_concept_folder(shape, folder)
    return folder


def train_concept(shape: str, method: str, out: Path, data_root: Path, seed: int = 0,
                  base: Path = BASE_WEIGHTS, init_lora: Path | None = None, on_step=None,
                  prior_prompts: list[str] | None = None, **overrides) -> ToyDenoiser:
    """Trains one LoRA; returns the denoiser with the trained student LoRA attached. prior_prompts: the
    prior preservation prompts (the config's prior_weight turns the term on)."""
    den = load_toy_file(base)
    records = den.build_records(load_image_folder(concept_data(shape, data_root), den.resolution))
    cfg = TrainConfig(**{**TOY_BUDGET, "method": method, "seed": seed, **overrides})
    prior = Prior(list(prior_prompts), [den.encode_prompt(p) for p in prior_prompts]) if prior_prompts else None
    Trainer(den, records, cfg, out, Callbacks(on_step=on_step), init_lora=init_lora, prior=prior,
            trigger=CONCEPT_TOKEN[shape]).run()
    return den


def auto_prior(shape: str, data_root: Path, init_lora: Path | None = None, class_word: str | None = None) -> list[str]:
    """`--prior-prompts auto` for a toy concept (its captions, the empty prompt, an init LoRA's concepts,
    the toy's generic prompts)."""
    from ..prior import auto_prior_prompts, earlier_concepts
    from .render import prior_prompts
    captions = [c for item in load_image_folder(concept_data(shape, data_root), 32) for c in item.captions]
    earlier = earlier_concepts(read_lora_file(init_lora)[1]) if init_lora else []
    return auto_prior_prompts(captions, CONCEPT_TOKEN[shape], class_word, prior_prompts(), earlier)


@torch.no_grad()
def comparison_grid(base: ToyDenoiser, tuned: ToyDenoiser, prompts: list[str], seed: int = 0) -> "Image":
    """Rows: base, tuned; same seeds, 4 steps."""
    rows = []
    for den in (base, tuned):
        ctx = den.batch_contexts([den.encode_prompt(p) for p in prompts])
        lat = sample(den, ctx, (len(prompts), *den.latent_shape), den.sigma_grid(4), torch.Generator().manual_seed(seed))
        rows.append(latent_to_image(lat).permute(0, 2, 3, 1))
    return image_grid(rows, scale=4)


def demo(out: Path, concept: str = "star", steps: int | None = None, seed: int = 0, progress=None,
         eval_prompts: int = 192) -> dict:
    """Train a D-OPSD LoRA with the toy's defaults (the budget and the auto prior; DEMO_STEPS steps unless
    `steps`) for one held-out concept; write lora.safetensors, loss.png, samples.png, metrics.json (base vs
    LoRA)."""
    out = Path(out)
    t0 = time.perf_counter()
    steps = steps or DEMO_STEPS
    tuned = train_concept(concept, "dopsd", out, out, seed=seed, on_step=progress,
                          prior_prompts=auto_prior(concept, out), **TOY_PRIOR, steps=steps)
    train_s = time.perf_counter() - t0
    base = load_toy_file(BASE_WEIGHTS)
    token = CONCEPT_TOKEN[concept]
    prompts = [f"a {c} {token} on a {b} background" for c, b in
               (("red", "black"), ("yellow", "navy"), ("white", "gray"), ("green", "maroon"))]
    prompts += ["a blue circle on a black background", "a orange square on a gray background"]
    save_png(comparison_grid(base, tuned, prompts, seed), out / "samples.png")
    captions = [item.captions[0] for item in load_image_folder(concept_data(concept, out), base.resolution)]
    metrics = {"concept": concept, "token": token, "steps": steps, "train_seconds": round(train_s, 1)}
    if EVALUATOR_WEIGHTS.is_file():
        m = ToyMetrics(load_evaluator(), base, n_unrelated=eval_prompts)
        metrics["base"] = m.evaluate(base, concept, captions)
        metrics["lora"] = m.evaluate(tuned, concept, captions)
    else:
        metrics["note"] = "no evaluator weights shipped; metrics skipped"
    save_json(metrics, out / "metrics.json")
    return metrics

"""What the probes share: evaluating a run's checkpoints as the study does, and a concept's training captions
with and without their target in context (the student's and the teacher's contexts)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: the lab's modules
from dopsd_core.toy.denoiser import BASE_WEIGHTS, ToyContext, image_to_latent, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import concept_training_set


def evaluate_checkpoints(run: Path, concept: str, steps, captions: list[str] | None = None) -> tuple[str, list[dict]]:
    """Each step's lora-<step>.safetensors in `run` evaluated like the study's checkpoints
    (StudyMetrics.checkpoint, per-sample hits left out); captions default to the concept's training captions.
    Returns the base fingerprint and the points, printing each as it comes."""
    from experiments.toy.lab.runs import load_with_lora
    from experiments.toy.lab.study import N_UNRELATED, StudyMetrics
    base = load_toy_file(BASE_WEIGHTS)
    metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
    captions = captions or [caps[0] for caps in concept_training_set(concept)[1]]
    points = []
    for step in steps:
        p = metrics.checkpoint(load_with_lora(run / f"lora-{step:06d}.safetensors"), concept, captions)
        points.append({"step": step, **{k: v for k, v in p.items() if k != "hits"}})
        print(json.dumps(points[-1]), flush=True)
    return base.fingerprint(), points


def training_contexts(den, concept: str, seeds: int) -> tuple[ToyContext, ToyContext]:
    """The concept's first training caption per image, each repeated `seeds` times: (text only, with the
    target image in context)."""
    images, captions = concept_training_set(concept)
    texts = den.text_encoder.encode([caps[0] for caps in captions for _ in range(seeds)])
    refs = torch.stack([image_to_latent(img) for img in images for _ in range(seeds)])
    return ToyContext(texts, None), ToyContext(texts, refs)

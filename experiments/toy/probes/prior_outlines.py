"""Probe: does the prior hold the outline a concept LoRA has to replace? For each held-out concept, the
base's 4-step samples of its `auto` prior prompts' first 40 (the training captions with the trigger
removed), 2 noise seeds: the share drawn with the concept token's own base outline (metrics.outline_matches),
and the most common outlines and evaluator shapes.

usage: python experiments/toy/probes/prior_outlines.py DATA_DIR   (writes prior_outlines_<fingerprint>.json here)
"""
import collections
import json
import sys
from pathlib import Path

import torch

from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import generate, outline_matches
from dopsd_core.toy.render import CONCEPT_TOKEN, HELD_OUT_SHAPES
from dopsd_core.toy.runs import auto_prior

torch.set_num_threads(1)
den, ev = load_toy_file(BASE_WEIGHTS), load_evaluator()
result = {"base": den.fingerprint(), "concepts": {}}
for concept in HELD_OUT_SHAPES:
    prompts = auto_prior(concept, Path(sys.argv[1]))[:40]
    assert not any(CONCEPT_TOKEN[concept] in p for p in prompts), "the trigger-removed captions come first"
    images = torch.cat([generate(den, prompts, 4, seed) for seed in (1, 2)])
    outlines, shapes = collections.Counter(outline_matches(images)), collections.Counter(ev.classify(images)[0])
    own = outlines[CONCEPT_TOKEN[concept].lower()] / len(images)
    result["concepts"][concept] = {"samples": len(images), "own_outline": own, "prompts": prompts[:3],
                                   "outlines": outlines.most_common(3), "shapes": shapes.most_common(3)}
    print(concept, f"own outline {own:.2f}", outlines.most_common(3), shapes.most_common(3), flush=True)
(Path(__file__).parent / f"prior_outlines_{den.fingerprint()}.json").write_text(json.dumps(result, indent=1))

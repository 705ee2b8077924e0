"""Probe: how far, in the pixel MSE that D-OPSD's x0 loss measures, is each held-out shape from what its
token draws on the base? Each concept's 6 training scenes rendered with the shape and with its token's
base outline (render.TOKEN_OUTLINE), same colour, position, size and angle; also the nearest other
token's outline. A shape close to its token's outline gives the loss little to pull on.

usage: python experiments/toy/probes/outline_distance.py   (writes outline_distance.json here)
"""
import dataclasses
import json
from pathlib import Path

from dopsd_core.toy.render import CONCEPT_TOKEN, HELD_OUT_SHAPES, TOKEN_OUTLINE, concept_scenes, render


def mse(scene, shape: str) -> float:
    return ((render(scene) - render(dataclasses.replace(scene, shape=shape))) ** 2).mean().item()


result = {}
for concept in HELD_OUT_SHAPES:
    own = CONCEPT_TOKEN[concept].lower()
    scenes = concept_scenes(concept)
    result[concept] = {
        "own_token_outline": sum(mse(s, TOKEN_OUTLINE[own]) for s in scenes) / len(scenes),
        "nearest_other_outline": sum(min(mse(s, o) for t, o in TOKEN_OUTLINE.items() if t != own)
                                     for s in scenes) / len(scenes)}
    print(concept, {k: round(v, 4) for k, v in result[concept].items()})
(Path(__file__).parent / "outline_distance.json").write_text(json.dumps(result, indent=1))

"""toy/evaluator.py: the shipped evaluator tells every shape apart."""
import random

import torch

from dopsd_core.toy.evaluator import WEIGHTS as EVALUATOR, load_evaluator
from dopsd_core.toy.render import ALL_SHAPES, random_scene, render


def test_evaluator_tells_every_shape_apart():
    ev = load_evaluator(EVALUATOR)
    rng = random.Random(123)
    for shape in ALL_SHAPES:
        imgs = torch.stack([render(random_scene(rng, shape)) for _ in range(24)])
        shapes, _ = ev.classify(imgs)
        assert sum(s == shape for s in shapes) >= 22, (shape, shapes)

"""How render.TOKEN_OUTLINE was chosen (run once, then frozen like the vocabulary): scan blob seeds in
order, keep an outline when it is big enough to draw (area >= 0.4 of the circle's), unlike every known
shape (IoU <= 0.68) and every outline kept so far (IoU <= 0.55), and never called a held-out shape by the
evaluator over 48 random layouts (so the base's own drawing of a token never counts as a concept).

usage: python tools/token_outlines.py [--skip SEED ...]
Seeds 20 and 1884 were skipped by eye (a near-circle, a near-crescent); the result was assigned to the
tokens in the order [V], [V1] .. [V7], with 27 (a four-pointed outline) moved to [V8], a token no held-out
concept uses.
"""
import argparse
import random

import torch

from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.render import ALL_SHAPES, HELD_OUT_SHAPES, random_scene, render, shape_mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=int, nargs="*", default=[20, 1884])
    parser.add_argument("--count", type=int, default=9)
    args = parser.parse_args()
    ev = load_evaluator()
    axis = (torch.arange(96) + 0.5) / 96 * 2.4 - 1.2
    y, x = torch.meshgrid(axis, axis, indexing="ij")

    def iou(a, b):
        return ((a & b).sum() / (a | b).sum()).item()

    known = [shape_mask(s, x, y) for s in ALL_SHAPES]
    disc = shape_mask("circle", x, y).sum().item()
    kept, masks = [], []
    for seed in range(1, 6000):
        if seed in args.skip:
            continue
        m = shape_mask(f"blob:{seed}", x, y)
        if m.sum().item() / disc < 0.4 or max(iou(m, k) for k in known) > 0.68 or any(iou(m, k) > 0.55 for k in masks):
            continue
        rng = random.Random(f"outline-check-{seed}")
        shapes, _ = ev.classify(torch.stack([render(random_scene(rng, f"blob:{seed}")) for _ in range(48)]))
        if any(s in HELD_OUT_SHAPES for s in shapes):
            continue
        kept.append(seed)
        masks.append(m)
        print(seed, flush=True)
        if len(kept) == args.count:
            break
    print(kept)


if __name__ == "__main__":
    main()

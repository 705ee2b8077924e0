"""Training the toy evaluator (dopsd_core.toy.evaluator) on fresh renderings of every shape:
`python -m experiments.toy.lab toy-evaluator` writes the shipped toy_evaluator.safetensors."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd_core.fileio import save_tensors
from dopsd_core.toy.evaluator import WEIGHTS, Evaluator
from dopsd_core.toy.render import ALL_SHAPES, random_scene, render
from dopsd_core.toy.text import COLOURS


def _batch(rng: random.Random, n: int):
    scenes = [random_scene(rng, shapes=ALL_SHAPES) for _ in range(n)]
    x = torch.stack([render(s) for s in scenes])
    shape = torch.tensor([ALL_SHAPES.index(s.shape) for s in scenes])
    colour = torch.tensor([COLOURS.index(s.colour) for s in scenes])
    return x, shape, colour


def train_evaluator(out: Path = WEIGHTS, steps: int = 2500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                    log_every: int = 100) -> dict:
    """Trains on fresh renderings with light noise/blur augmentation (generated samples are not
    pixel-perfect); returns held-out accuracies on clean renderings."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * max(0.05, 1 - step / steps)
        x, shape, colour = _batch(rng, batch)
        if rng.random() < 0.5:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) * 0.5 + x * 0.5
        x = (x + torch.randn_like(x) * rng.uniform(0.0, 0.08)).clamp(0, 1)
        s, c = model(x)
        loss = F.cross_entropy(s, shape) + F.cross_entropy(c, colour)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0:
            print(f"[evaluator] {step}/{steps} loss {loss.item():.4f} {step / (time.perf_counter() - t0):.1f} it/s", flush=True)
    model.eval()
    x, shape, colour = _batch(random.Random(seed + 999), 1024)
    with torch.no_grad():
        s, c = model(x)
    acc = {"shape_acc": (s.argmax(1) == shape).float().mean().item(),
           "colour_acc": (c.argmax(1) == colour).float().mean().item()}
    save_tensors(model.state_dict(), out, {"dopsd.evaluator": json.dumps(acc)})
    return acc

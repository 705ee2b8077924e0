"""The toy world's evaluator: a small CNN with a shape head and a colour head, trained on renderings
of every shape (held-out ones included). Used only for measurement; its penultimate features give a
toy-FID between generated images and real renderings of the same prompts."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import load_tensors, save_tensors
from .render import ALL_SHAPES, random_scene, render
from .text import COLOURS

WEIGHTS = Path(__file__).parent / "weights" / "toy_evaluator.safetensors"
FEATURES = 64


class Evaluator(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 24, 3, padding=1), nn.GELU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.GELU(),   # 16x16
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.GELU(),   # 8x8
            nn.Conv2d(96, 128, 3, stride=2, padding=1), nn.GELU(),  # 4x4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, FEATURES), nn.GELU(),
        )
        self.shape_head = nn.Linear(FEATURES, len(ALL_SHAPES))
        self.colour_head = nn.Linear(FEATURES, len(COLOURS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, 32, 32] in [0, 1] -> [B, FEATURES]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return self.shape_head(f), self.colour_head(f)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        s, c = self(images)
        return [ALL_SHAPES[i] for i in s.argmax(1)], [COLOURS[i] for i in c.argmax(1)]


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


def load_evaluator(path: Path = WEIGHTS) -> Evaluator:
    model = Evaluator()
    sd, _ = load_tensors(path)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr sqrt(cov_a cov_b) = sum sqrt(eig(sqrt(cov_a) cov_b sqrt(cov_a))), all symmetric PSD
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * mid)

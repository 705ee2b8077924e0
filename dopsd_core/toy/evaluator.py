"""The toy world's evaluator: a small CNN with a shape head and a colour head, trained on renderings
of every shape (held-out ones included). Used only for measurement; its penultimate features give a
toy-FID between generated images and real renderings of the same prompts. The lab trains it
(experiments/toy/lab/evaluator_training.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..fileio import load_tensors
from .render import ALL_SHAPES
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

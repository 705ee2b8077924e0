"""Shared by the token probes: the shipped toy base with fresh embedding rows for [V1] [V2] [V3]."""
from pathlib import Path

import torch

from dopsd_core.fileio import load_tensors, save_tensors
from dopsd_core.toy.denoiser import BASE_WEIGHTS
from dopsd_core.toy.text import TOKEN_ID


def rerolled_base(out: Path, seed: int = 0) -> Path:
    """Writes out/base_reroll.safetensors: the base whose [v1] [v2] [v3] rows are random directions with the
    mean norm of the other vocabulary rows (<pad> left out); returns its path."""
    sd, meta = load_tensors(BASE_WEIGHTS)
    E = sd["text_encoder.embed.weight"].clone()
    norm = E[[i for i in range(E.shape[0]) if i != TOKEN_ID["<pad>"]]].norm(dim=1).mean()
    g = torch.Generator().manual_seed(seed)
    for t in ("[v1]", "[v2]", "[v3]"):
        v = torch.randn(E.shape[1], generator=g)
        E[TOKEN_ID[t]] = v / v.norm() * norm
    sd["text_encoder.embed.weight"] = E
    path = Path(out) / "base_reroll.safetensors"
    save_tensors(sd, path, meta)
    return path

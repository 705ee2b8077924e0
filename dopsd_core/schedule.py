"""Sigma grids. sigma in [0, 1], sigma = 1 is pure noise; x_sigma = (1 - sigma) x0 + sigma eps."""
from __future__ import annotations

import torch


def shift_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Time shift of flow models (SD3 / ComfyUI `time_snr_shift`): sigma = s t / (1 + (s - 1) t)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return shift * t / (1 + (shift - 1) * t)


def comfy_simple_sigmas(shift: float, steps: int, timesteps: int = 1000) -> list[float]:
    """The grid ComfyUI's stock `simple` scheduler gives a discrete-flow model with this shift.

    ComfyUI tabulates sigma at t = i / timesteps (i = 1..timesteps) and the `simple` scheduler takes
    every (timesteps / steps)-th entry from the top, then appends 0. With shift 3 and 4 steps this is
    1, .9, .75, .5, 0 (Z-Image-Turbo's training grid)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    table = shift_sigma(torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps, shift)
    stride = timesteps / steps
    return [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def logit_normal_sigmas(n: int, shift: float, generator: torch.Generator, min_sigma: float = 1e-3) -> torch.Tensor:
    """Training-time sigma distribution of the toy base and of SFT: shift(sigmoid(N(0, 1)))."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift_sigma(u, shift).clamp(min=min_sigma)

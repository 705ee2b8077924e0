"""The one interface the training loop knows, and the few-step Euler sampler built on it.

A Denoiser returns the clean-image prediction x0_hat = x_t - sigma * v (as ComfyUI's
BaseModel.apply_model does). Contexts are opaque to the core: each adapter builds its own student
(text only) and teacher (text + target image) contexts and batches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .lora import LoraSet

Context = Any  # adapter-specific; the core only passes it back


@dataclass
class Record:
    """One training image after the dataset build: its latent and, per caption variant, the
    student context (caption only) and the teacher context (caption + the image in context)."""
    name: str
    x0: torch.Tensor  # [C, H, W] latent
    captions: list[str]
    student_ctx: list[Context]
    teacher_ctx: list[Context]


@runtime_checkable
class Denoiser(Protocol):
    family: str  # the family's name, recorded in run folders and LoRA metadata

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: Context) -> torch.Tensor:
        """x_t: [B, C, H, W], sigma: [B] -> x0_hat: [B, C, H, W]."""

    def lora(self) -> LoraSet: ...

    def set_checkpointing(self, on: bool) -> None: ...

    def batch_contexts(self, ctxs: list[Context]) -> Context: ...

    def fingerprint(self) -> str:
        """Identifies the base weights; a run folder only resumes on the same base."""

    def sigma_grid(self, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The few-step grid sigma_0 = 1 > ... > sigma_steps = 0 for latents of shape [C, H, W]."""


def euler_step(x: torch.Tensor, x0_hat: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x + (sigma_next - sigma) * v with v = (x - x0_hat) / sigma, written without dividing by sigma
    where it can be avoided: the last step (sigma_next = 0) returns x0_hat exactly."""
    if sigma_next == 0.0:
        return x0_hat
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * x0_hat


@torch.no_grad()
def sample(denoiser: Denoiser, ctx: Context, shape: tuple[int, ...], sigmas: list[float],
           generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Few-step Euler sampling from pure noise (sigmas[0] must be 1). Returns the final latent."""
    x = torch.randn(shape, generator=generator).to(device) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((shape[0],), sigma, device=device)
        x = euler_step(x, denoiser.denoise(x, s, ctx), sigma, sigma_next)
    return x

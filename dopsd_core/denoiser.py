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
    """The model contract: every member the trainer, the objectives, the prior and the sampler use.
    Implementations: toy/denoiser.py ToyDenoiser, hosts/comfy.py ComfyDenoiser (tests/test_denoiser.py
    checks that each has every member). One optional member: `train_shift: float`, the shift of the base's
    training sigma distribution, which SFT draws from; a model without one trains SFT at `shift`."""

    family: str  # the family's name, recorded in run folders and LoRA metadata
    shift: float  # the flow shift of the model's sampling schedule

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: Context) -> torch.Tensor:
        """x_t: [B, C, H, W], sigma: [B] -> x0_hat: [B, C, H, W], through the attached LoRA's current mode."""

    def add_lora(self, rank: int, alpha: float, seed: int = 0, adapter: str = "lora", factor: int = -1) -> LoraSet:
        """Attach a fresh adapter (lora, lokr or loha; dW = 0) to the family's target layers, replacing an
        earlier one; returns it."""

    def lora(self) -> LoraSet:
        """The attached LoRA: student / teacher (EMA) / anchor / off modes, parameters, state dicts."""

    def set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing per transformer block, on or off."""

    def batch_contexts(self, ctxs: list[Context]) -> Context:
        """Per-sample contexts -> one batch context; ValueError where they cannot share a batch."""

    def fingerprint(self) -> str:
        """Identifies the base weights; a run folder only resumes on the same base."""

    def sigma_grid(self, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The few-step grid sigma_0 = 1 > ... > sigma_steps = 0 for latents of shape [C, H, W]."""


@runtime_checkable
class PromptDenoiser(Denoiser, Protocol):
    """A Denoiser that encodes its own prompts and decodes its own latents (the toy): what the trainer's
    previews of preview_prompts and the CLI's sampling use. A ComfyUI model gets its contexts from
    ComfyUI's text encoder at dataset build and previews through Trainer(preview_fn=...) instead."""

    latent_shape: tuple[int, ...]  # [C, H, W] of the latents it samples

    def encode_prompt(self, caption: str) -> Context:
        """A caption -> a student (text-only) context of batch size 1."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] -> images [B, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout)."""


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

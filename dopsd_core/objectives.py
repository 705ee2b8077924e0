"""The two objectives: D-OPSD (on-policy self-distillation) and the SFT flow-matching baseline.

Each one runs forward and backward for one micro-batch (gradients accumulate in the student LoRA)
and returns plain-float metrics. Neither touches the optimizer: the trainer owns that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .denoiser import Context, Denoiser, euler_step
from .schedule import logit_normal_sigmas

LOSS_WEIGHTS = ("x0", "velocity", "transition")
TEACHERS = ("ema", "frozen")  # the concept teacher a user picks
# LoRA copy each teacher reads; "start" (the LoRA the run started from, frozen) is the prior's teacher
TEACHER_MODES = {"ema": "teacher", "frozen": "off", "start": "anchor"}
STATES = ("all", "one", "two")  # supervised states of a roll-out: all K, or that many drawn at random


@dataclass
class Batch:
    x0: torch.Tensor  # [B, C, H, W] clean latents (SFT's target; D-OPSD only uses its shape)
    student_ctx: Context  # caption only
    teacher_ctx: Context  # caption + the target image in context
    # Data parallelism: these B rows are rows[start:stop] of a global batch of global_size. Noise is drawn
    # for the whole global batch and sliced, so a row's noise does not depend on how the batch is split.
    rows: slice | None = None
    global_size: int | None = None

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise of this batch's rows, drawn for the whole global batch."""
        if self.rows is None:
            return torch.randn(self.x0.shape, generator=generator)
        return torch.randn((self.global_size, *self.x0.shape[1:]), generator=generator)[self.rows]


def step_weight(kind: str, sigma: float, sigma_next: float) -> float:
    """Weight c_k of the x0-space MSE at state k. Since x0_hat = x - sigma * v at the same x,
    w_k * |v_S - v_T|^2 = (w_k / sigma^2) * |x0_S - x0_T|^2, so:
    x0: w = sigma^2 -> c = 1;  velocity: w = 1 -> c = 1/sigma^2;  transition: w = dsigma^2 -> c = (dsigma/sigma)^2."""
    if kind == "x0":
        return 1.0
    if kind == "velocity":
        return 1.0 / sigma**2
    if kind == "transition":
        return ((sigma_next - sigma) / sigma) ** 2
    raise ValueError(f"loss weight must be one of {LOSS_WEIGHTS}, got {kind!r}")


def dopsd_backward(denoiser: Denoiser, batch: Batch, sigmas: list[float], generator: torch.Generator, *,
                   teacher: str = "ema", loss_weight: str = "x0", states: str = "all",
                   loss_scale: float = 1.0) -> dict:
    """One D-OPSD roll-out with per-state backward.

    x starts as pure noise; at each supervised state k the teacher (EMA LoRA or frozen base, with the
    target image in context, no grad) and the student (caption only, with grad) predict x0 from the
    same x; loss_k = c_k * mean((x0_S - x0_T)^2) is backpropagated at once, so activation memory does
    not grow with K; then x takes the student's own Euler step (detached): on-policy.
    The prior's roll-out is the same with teacher="start" and the prior prompts as both contexts: the
    run's starting model, text only, anchors the student on its own states."""
    lora = denoiser.lora()
    teacher_mode = TEACHER_MODES[teacher]
    K = len(sigmas) - 1
    B = batch.x0.shape[0]
    device = batch.x0.device
    if states == "all":
        supervised = list(range(K))
    elif states == "one":
        supervised = [int(torch.randint(K, (1,), generator=generator))]
    else:  # "two": two distinct states; the student steps through the ones between them without a graph
        supervised = sorted(torch.randperm(K, generator=generator)[:2].tolist())
    x = batch.noise(generator).to(device) * sigmas[0]  # x_{sigma_0 = 1} = eps
    if supervised[0] > 0:
        # one-state mode: the student's own prefix with no autograd bookkeeping at all (inference_mode),
        # then one plain copy of the state so autograd may use it
        with torch.inference_mode(), lora.use("student"):
            for k in range(supervised[0]):
                s = torch.full((B,), sigmas[k], device=device)
                x = euler_step(x, denoiser.denoise(x, s, batch.student_ctx), sigmas[k], sigmas[k + 1])
        x = x.clone()
    losses = []  # 0-d tensors: one host sync after the roll-out instead of one per state
    chosen = set(supervised)
    for k in range(supervised[0], supervised[-1] + 1):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        s = torch.full((B,), sigma, device=device)
        if k not in chosen:  # a state between two supervised ones: the student's own step, no graph
            with torch.inference_mode(), lora.use("student"):
                x = euler_step(x, denoiser.denoise(x, s, batch.student_ctx), sigma, sigma_next)
            x = x.clone()
            continue
        with torch.inference_mode(), lora.use(teacher_mode):
            x0_teacher = denoiser.denoise(x, s, batch.teacher_ctx)
        x0_teacher = x0_teacher.clone()  # inference tensors cannot be saved by autograd (mse_loss keeps its target)
        with lora.use("student"):
            x0_student = denoiser.denoise(x, s, batch.student_ctx)
            loss_k = step_weight(loss_weight, sigma, sigma_next) * F.mse_loss(x0_student.float(), x0_teacher.float())
            (loss_k * (loss_scale / len(supervised))).backward()
        losses.append(loss_k.detach())
        del x0_teacher
        x = euler_step(x, x0_student.detach(), sigma, sigma_next)
    values = torch.stack(losses).tolist()
    per_state = dict(zip(supervised, values))
    return {"loss": sum(values) / len(values), "per_state": per_state}


def sft_backward(denoiser: Denoiser, batch: Batch, shift: float, generator: torch.Generator, *,
                 loss_scale: float = 1.0) -> dict:
    """Flow matching on data: x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 (velocity MSE,
    computed in x0 space as |x0_hat - x0|^2 / sigma^2 to avoid forming v from x0_hat)."""
    lora = denoiser.lora()
    B = batch.x0.shape[0]
    device = batch.x0.device
    if batch.rows is None:
        sigma = logit_normal_sigmas(B, shift, generator).to(device)
    else:  # drawn for the global batch, as the noise
        sigma = logit_normal_sigmas(batch.global_size, shift, generator)[batch.rows].to(device)
    eps = batch.noise(generator).to(device)
    s4 = sigma.reshape(-1, 1, 1, 1)
    x_t = (1 - s4) * batch.x0 + s4 * eps
    with lora.use("student"):
        x0_hat = denoiser.denoise(x_t, sigma, batch.student_ctx)
        per_sample = ((x0_hat.float() - batch.x0.float()) ** 2).flatten(1).mean(1) / sigma.float() ** 2
        loss = per_sample.mean()
        (loss * loss_scale).backward()
    return {"loss": loss.item()}

"""Bootstrap intervals for comparing two methods on the toy metrics.

A run's outcome on a metric is a list of per-prompt values (0/1 hits, or a prompt's mean over its noise
seeds). Two methods are compared over their training seeds: each bootstrap draw resamples the training
seeds of each method with replacement, then the prompts within every drawn seed, and takes the
difference of the two means. Resampling both levels keeps the interval honest about the few seeds a
toy study can afford and about which prompts happened to be drawn.
"""
from __future__ import annotations

import torch


def per_prompt(hits: str, samples_per_prompt: int = 1) -> list[float]:
    """A result file's hit string (prompt-major) -> one value per prompt (its mean over its samples)."""
    if len(hits) % samples_per_prompt:
        raise ValueError(f"{len(hits)} outcomes do not split into prompts of {samples_per_prompt} samples")
    values = [1.0 if c == "1" else 0.0 for c in hits]
    k = samples_per_prompt
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def _draw(runs: torch.Tensor, gen: torch.Generator, n_boot: int) -> torch.Tensor:
    """runs [S, P] (seeds x prompts) -> n_boot means of a seeds-then-prompts resample."""
    s, p = runs.shape
    seeds = torch.randint(s, (n_boot, s), generator=gen)  # [B, S]
    prompts = torch.randint(p, (n_boot, s, p), generator=gen)  # [B, S, P]
    drawn = runs[seeds.unsqueeze(-1), prompts]  # [B, S, P]
    return drawn.mean(dim=(1, 2))


def bootstrap_difference(a: list[list[float]], b: list[list[float]], n_boot: int = 4000, seed: int = 0,
                         level: float = 0.95) -> dict:
    """mean(a) - mean(b) and its bootstrap interval. a, b: per training seed, the per-prompt values
    (every run of a method on the same prompts)."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.ndim != 2 or tb.ndim != 2 or not ta.numel() or not tb.numel():
        raise ValueError("each method needs at least one run with at least one prompt")
    gen = torch.Generator().manual_seed(seed)
    diffs = _draw(ta, gen, n_boot) - _draw(tb, gen, n_boot)
    lo, hi = torch.quantile(diffs, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"diff": (ta.mean() - tb.mean()).item(), "lo": lo, "hi": hi, "level": level,
            "runs": [ta.shape[0], tb.shape[0]], "prompts": [ta.shape[1], tb.shape[1]]}

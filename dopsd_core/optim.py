"""Optimizers, the learning-rate schedule, and optimizer state as safetensors + JSON (no pickle)."""
from __future__ import annotations

import math

import torch

from .errors import DopsdError

OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("constant", "cosine")


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DopsdError("--optimizer adamw8bit needs bitsandbytes: pip install 'comfyui-dopsd[8bit]' "
                             "(or pip install bitsandbytes), or use --optimizer adamw") from None
        # min_8bit_size=0: LoRA matrices are small (rank 16 x 256 = 4096 elements is bnb's default cut-off),
        # and a user who asks for 8-bit states should get them for every tensor.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
    raise DopsdError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str) -> float:
    """LR for optimizer step `step` (0-based) of a run of `total` steps: linear warm-up, then constant
    or cosine decay to 0. Depends only on (step, total), so a resumed run follows the same curve."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise DopsdError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON-able values. Nested dicts
    (bitsandbytes keeps its 8-bit state in one) are flattened with '/' in the key."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif torch.is_tensor(value):
            tensors[prefix] = value
        else:
            scalars[prefix] = value
    for idx, state in sd["state"].items():
        for name, value in state.items():
            walk(f"{idx}.{name}", value)
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_state_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], extra: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(extra["scalars"].items()):
        idx, path = key.split(".", 1)
        node = state.setdefault(int(idx), {})
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in extra["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})

"""LoRA with a student and a teacher (EMA) copy, injected as removable forward hooks.

Why hooks and not module replacement (peft): module names and the base state dict stay untouched,
the hooks work on any Linear-like module (ComfyUI's casting ops, fp8-stored weights), and removing
them leaves the shared model exactly as it was. One switch selects what every hooked layer adds:
  "student": + scale * B_S A_S x     (trainable)
  "teacher": + scale * B_T A_T x     (EMA copy, never trained directly)
  "anchor":  + scale * B_0 A_0 x     (the LoRA the run started from, frozen: the prior's teacher)
  "off":     nothing                 (the frozen base model)

Files use ComfyUI's key layout, so the stock LoraLoaderModelOnly loads them:
  diffusion_model.<module>.lora_down.weight [r, in]   (A)
  diffusion_model.<module>.lora_up.weight   [out, r]  (B)
  diffusion_model.<module>.alpha            scalar
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DopsdError
from .fileio import load_tensors, save_tensors

MODES = ("student", "teacher", "anchor", "off")
COMFY_PREFIX = "diffusion_model."


def find_targets(root: nn.Module, pattern: str) -> list[str]:
    """Names of the modules under root whose full name matches `pattern` and that have a 2-D weight."""
    rx = re.compile(pattern)
    names = [n for n, m in root.named_modules()
             if rx.fullmatch(n) and getattr(m, "weight", None) is not None and m.weight.ndim == 2]
    if not names:
        raise DopsdError(f"no module matches the LoRA target pattern {pattern!r}; check the model family preset")
    return names


def _key(name: str) -> str:  # module names contain dots, which nn.ModuleDict keys may not
    return name.replace(".", "/")


class LoraPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # B = 0: starts as the base model
        bound = 1.0 / math.sqrt(in_features)  # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear and peft use
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)


class LoraSet(nn.Module):
    def __init__(self, root: nn.Module, targets: list[str], rank: int, alpha: float,
                 seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank <= 0:
            raise DopsdError(f"LoRA rank must be > 0 (got {rank}); use e.g. --rank 16")
        self.targets, self.rank, self.alpha = list(targets), int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        modules = dict(root.named_modules())
        missing = [t for t in targets if t not in modules]
        if missing:
            raise DopsdError(f"LoRA targets not found in the model: {missing[:5]}")
        device = next(root.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        self.student = nn.ModuleDict()
        for name in targets:
            out_f, in_f = modules[name].weight.shape
            self.student[_key(name)] = LoraPair(in_f, out_f, rank, gen).to(device=device, dtype=dtype)
        # The teacher is plain tensors (no Parameters): no optimizer, no autograd, only EMA updates.
        self.teacher = {n: {"down": p.down.detach().clone(), "up": p.up.detach().clone()}
                        for n, p in self._student_items()}
        self.anchor = {n: {"down": p.down.detach().clone(), "up": p.up.detach().clone()}
                       for n, p in self._student_items()}
        self.mode = "student"
        self._modules_by_name = {t: modules[t] for t in targets}
        self._handles: list = []

    # --- injection -------------------------------------------------------------------------------
    def attach(self) -> "LoraSet":
        if self._handles:
            return self
        for name, module in self._modules_by_name.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        wrapped = {n for n in self._modules_by_name}
        if wrapped != set(self.targets) or len(self._handles) != len(self.targets):
            raise RuntimeError("wrapped module set differs from the configured LoRA targets")
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def wrapped_modules(self) -> list[str]:
        return sorted(self._modules_by_name) if self._handles else []

    def _make_hook(self, name: str):
        pair = self.student[_key(name)]
        frozen = {"teacher": self.teacher[name], "anchor": self.anchor[name]}

        def hook(module, inputs, output):
            if self.mode == "off":
                return None
            down, up = (pair.down, pair.up) if self.mode == "student" else (frozen[self.mode]["down"],
                                                                             frozen[self.mode]["up"])
            x = inputs[0]
            delta = F.linear(F.linear(x.to(down.dtype), down), up) * self.scale
            return output + delta.to(output.dtype)
        return hook

    @contextlib.contextmanager
    def use(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"LoRA mode must be one of {MODES}, got {mode!r}")
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous

    # --- parameters --------------------------------------------------------------------------------
    def _student_items(self):
        for name in self.targets:
            yield name, self.student[_key(name)]

    def parameters_list(self) -> list[nn.Parameter]:
        return [p for _, pair in self._student_items() for p in (pair.down, pair.up)]

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, for every A and B."""
        teacher, student = [], []
        for name, pair in self._student_items():
            teacher += [self.teacher[name]["down"], self.teacher[name]["up"]]
            student += [pair.down, pair.up]
        torch._foreach_lerp_(teacher, student, 1.0 - decay)  # one fused call over all A and B (GPU: few launches)

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        for name, pair in self._student_items():
            self.teacher[name]["down"].copy_(pair.down)
            self.teacher[name]["up"].copy_(pair.up)

    @torch.no_grad()
    def copy_student_to_anchor(self) -> None:
        """The run's starting LoRA (a warm start's file); a fresh LoRA's anchor equals the base (B = 0)."""
        for name, pair in self._student_items():
            self.anchor[name]["down"].copy_(pair.down)
            self.anchor[name]["up"].copy_(pair.up)

    def _weights(self, name: str, pair: LoraPair, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module's student, teacher or anchor copy."""
        if which == "student":
            return pair.down, pair.up
        if which not in ("teacher", "anchor"):
            raise ValueError(f"LoRA copy must be student, teacher or anchor, got {which!r}")
        copy = getattr(self, which)[name]
        return copy["down"], copy["up"]

    # --- ComfyUI-layout state dicts ---------------------------------------------------------------------
    def state_dict_comfy(self, which: str = "student", prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
        sd = {}
        for name, pair in self._student_items():
            down, up = self._weights(name, pair, which)
            sd[f"{prefix}{name}.lora_down.weight"] = down.detach().clone()
            sd[f"{prefix}{name}.lora_up.weight"] = up.detach().clone()
            sd[f"{prefix}{name}.alpha"] = torch.tensor(self.alpha)
        return sd

    @torch.no_grad()
    def load_state_dict_comfy(self, sd: dict[str, torch.Tensor], which: str = "student",
                              prefix: str = COMFY_PREFIX, source: str = "LoRA file") -> None:
        """Load a ComfyUI-layout LoRA. Every target must be present with matching shapes and alpha/rank,
        and no key may be left over: a LoRA that loads partially is an error, never silent."""
        expected = set()
        for name, pair in self._student_items():
            kd, ku, ka = (f"{prefix}{name}.lora_down.weight", f"{prefix}{name}.lora_up.weight", f"{prefix}{name}.alpha")
            expected |= {kd, ku, ka}
            if kd not in sd or ku not in sd:
                raise DopsdError(f"{source} has no LoRA for module {name!r}; it was made for another model or "
                                 "another target set (LoRA metadata lists its wrapped modules)")
            down, up = sd[kd], sd[ku]
            if tuple(down.shape) != tuple(pair.down.shape) or tuple(up.shape) != tuple(pair.up.shape):
                raise DopsdError(f"{source}: module {name!r} has LoRA shapes {tuple(down.shape)}/{tuple(up.shape)}, "
                                 f"expected {tuple(pair.down.shape)}/{tuple(pair.up.shape)} (rank {self.rank}); "
                                 "use the rank the file was trained with")
            if ka in sd and not math.isclose(float(sd[ka]), self.alpha, rel_tol=1e-6):
                raise DopsdError(f"{source}: alpha {float(sd[ka])} differs from the configured {self.alpha}")
            dst = self._weights(name, pair, which)
            dst[0].copy_(down.to(dst[0].dtype))
            dst[1].copy_(up.to(dst[1].dtype))
        extra = sorted(set(sd) - expected)
        if extra:
            raise DopsdError(f"{source} has {len(extra)} keys for modules this model's LoRA does not wrap "
                             f"(e.g. {extra[0]!r}); it was made for another model or target set")


def lora_metadata(lora: LoraSet, **fields) -> dict[str, str]:
    """safetensors metadata (str -> str); lists and dicts are JSON."""
    meta = {"dopsd.rank": str(lora.rank), "dopsd.alpha": str(lora.alpha),
            "dopsd.wrapped_modules": json.dumps(lora.targets)}
    for k, v in fields.items():
        meta[f"dopsd.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_lora(lora: LoraSet, path: Path, which: str = "student", **metadata) -> None:
    save_tensors(lora.state_dict_comfy(which), path, lora_metadata(lora, **metadata))


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DopsdError(f"LoRA file {path} does not exist; pass a .safetensors written by `dopsd train`")
    try:
        return load_tensors(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DopsdError(f"cannot read LoRA file {path} ({e}); pass a .safetensors LoRA file") from None


def lora_file_shape(metadata: dict[str, str], sd: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(rank, alpha) of a ComfyUI-layout LoRA file, from metadata or from the tensors."""
    if "dopsd.rank" in metadata:
        return int(metadata["dopsd.rank"]), float(metadata["dopsd.alpha"])
    down = next((v for k, v in sd.items() if k.endswith(".lora_down.weight")), None)
    if down is None:
        raise DopsdError("the LoRA file has no *.lora_down.weight keys; it is not a ComfyUI-layout LoRA")
    alpha_key = next((k for k in sd if k.endswith(".alpha")), None)
    rank = down.shape[0]
    return rank, float(sd[alpha_key]) if alpha_key else float(rank)

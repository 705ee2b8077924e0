"""LoRA (and its LyCORIS relatives LoKr and LoHa) with a student and a teacher (EMA) copy, injected as
removable forward hooks.

Why hooks and not module replacement (peft): module names and the base state dict stay untouched,
the hooks work on any Linear-like module (ComfyUI's casting ops, fp8-stored weights), and removing
them leaves the shared model exactly as it was. One switch selects what every hooked layer adds:
  "student": + scale * B_S A_S x     (trainable)
  "teacher": + scale * B_T A_T x     (EMA copy, never trained directly)
  "anchor":  + scale * B_0 A_0 x     (the LoRA the run started from, frozen: the prior's teacher)
  "off":     nothing                 (the frozen base model)

Files use the key layout ComfyUI's stock LoraLoaderModelOnly applies (comfy/weight_adapter), with
`diffusion_model.<module>.alpha`; every adapter's update is scaled by alpha / rank:
  lora: .lora_down.weight [r, in] (A), .lora_up.weight [out, r] (B)            dW = B A
  loha: .hada_w1_a [out, r], .hada_w1_b [r, in], .hada_w2_a, .hada_w2_b       dW = (w1_a w1_b) * (w2_a w2_b)
  lokr: .lokr_w1 [out_l, in_m], .lokr_w2_a [out_k, r], .lokr_w2_b [r, in_n]   dW = kron(w1, w2_a w2_b)
        with out = out_l * out_k and in = in_m * in_n split by LyCORIS's factorization(dim, factor)
Each starts with dW = 0 (its output-side factor is zero), so at step 0 student = teacher = base.
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


ADAPTERS = ("lora", "lokr", "loha")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """dimension = m * n with m <= n: m = factor when it divides (and m <= n), else the split whose m is the
    largest divisor not above factor (factor -1: as near the square root as divisors allow). LyCORIS's
    rule, which ComfyUI's LoKr also uses, so the shapes are the ones other trainers write."""
    if factor > 0 and dimension % factor == 0 and dimension >= factor ** 2:
        return factor, dimension // factor
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def _kaiming_(t: torch.Tensor, fan_in: int, generator) -> None:
    """kaiming-uniform(a=sqrt(5)) bound, as nn.Linear and peft initialise A."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)


class LoraPair(nn.Module):
    kind = "lora"
    files = {"down": "lora_down.weight", "up": "lora_up.weight"}  # parameter -> file key suffix

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None,
                 factor: int = -1):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # B = 0: starts as the base model
        _kaiming_(self.down, in_features, generator)

    @staticmethod
    def delta(x: torch.Tensor, w: dict, scale: float) -> torch.Tensor:
        return F.linear(F.linear(x, w["down"]), w["up"]) * scale


class LohaPair(nn.Module):
    """LoHa: the Hadamard product of two rank-r products (LyCORIS init: w2_a = 0)."""
    kind = "loha"
    files = {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a", "w2_b": "hada_w2_b"}

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None,
                 factor: int = -1):
        super().__init__()
        self.w1_a = nn.Parameter(torch.randn(out_features, rank, generator=generator) * 0.1)
        self.w1_b = nn.Parameter(torch.randn(rank, in_features, generator=generator))
        self.w2_a = nn.Parameter(torch.zeros(out_features, rank))
        self.w2_b = nn.Parameter(torch.randn(rank, in_features, generator=generator))

    @staticmethod
    def delta(x: torch.Tensor, w: dict, scale: float) -> torch.Tensor:
        # (w1_a w1_b) * (w2_a w2_b) = U V with U[:, (i, j)] = w1_a[:, i] w2_a[:, j] and
        # V[(i, j), :] = w1_b[i] w2_b[j]: two thin matmuls instead of a full [out, in] update
        u = (w["w1_a"][:, :, None] * w["w2_a"][:, None, :]).flatten(1)  # [out, r*r]
        v = (w["w1_b"][:, None, :] * w["w2_b"][None, :, :]).flatten(0, 1)  # [r*r, in]
        return F.linear(F.linear(x, v), u) * scale


class LokrPair(nn.Module):
    """LoKr: kron(w1, w2_a w2_b), w1 small and full, w2 low-rank (output side w2_a = 0 at the start)."""
    kind = "lokr"
    files = {"w1": "lokr_w1", "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b"}

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator | None,
                 factor: int = -1):
        super().__init__()
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        self.w1 = nn.Parameter(torch.empty(out_l, in_m))
        self.w2_a = nn.Parameter(torch.zeros(out_k, rank))
        self.w2_b = nn.Parameter(torch.empty(rank, in_n))
        _kaiming_(self.w1, in_m, generator)
        _kaiming_(self.w2_b, in_n, generator)

    @staticmethod
    def delta(x: torch.Tensor, w: dict, scale: float) -> torch.Tensor:
        # kron(w1, w2) x without the [out, in] product: x as [in_m, in_n], w2 on n, then w1 on m
        w1, w2 = w["w1"], w["w2_a"] @ w["w2_b"]
        t = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1]) @ w2.T  # [..., in_m, out_k]
        y = torch.matmul(w1, t)  # [..., out_l, out_k]
        return y.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0]) * scale


ADAPTER_CLASSES = {c.kind: c for c in (LoraPair, LokrPair, LohaPair)}


class LoraSet(nn.Module):
    def __init__(self, root: nn.Module, targets: list[str], rank: int, alpha: float,
                 seed: int = 0, dtype: torch.dtype = torch.float32, adapter: str = "lora", factor: int = -1):
        super().__init__()
        if rank <= 0:
            raise DopsdError(f"LoRA rank must be > 0 (got {rank}); use e.g. --rank 16")
        if adapter not in ADAPTER_CLASSES:
            raise DopsdError(f"adapter {adapter!r} is not one of {', '.join(ADAPTERS)}")
        self.targets, self.rank, self.alpha = list(targets), int(rank), float(alpha)
        self.adapter, self.factor = adapter, int(factor)
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
            self.student[_key(name)] = ADAPTER_CLASSES[adapter](in_f, out_f, rank, gen, factor).to(device=device,
                                                                                               dtype=dtype)
        # The teacher is plain tensors (no Parameters): no optimizer, no autograd, only EMA updates.
        self.teacher = {n: {k: getattr(p, k).detach().clone() for k in p.files} for n, p in self._student_items()}
        self.anchor = {n: {k: getattr(p, k).detach().clone() for k in p.files} for n, p in self._student_items()}
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

        student = {k: getattr(pair, k) for k in pair.files}

        def hook(module, inputs, output):
            if self.mode == "off":
                return None
            w = student if self.mode == "student" else frozen[self.mode]
            x = inputs[0]
            delta = pair.delta(x.to(next(iter(w.values())).dtype), w, self.scale)
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
        return [getattr(pair, k) for _, pair in self._student_items() for k in pair.files]

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, for every factor."""
        teacher, student = [], []
        for name, pair in self._student_items():
            teacher += [self.teacher[name][k] for k in pair.files]
            student += [getattr(pair, k) for k in pair.files]
        torch._foreach_lerp_(teacher, student, 1.0 - decay)  # one fused call over all factors (GPU: few launches)

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        for name, pair in self._student_items():
            for k in pair.files:
                self.teacher[name][k].copy_(getattr(pair, k))

    @torch.no_grad()
    def copy_student_to_anchor(self) -> None:
        """The run's starting LoRA (a warm start's file); a fresh LoRA's anchor equals the base (dW = 0)."""
        for name, pair in self._student_items():
            for k in pair.files:
                self.anchor[name][k].copy_(getattr(pair, k))

    def _weights(self, name: str, pair, which: str) -> dict[str, torch.Tensor]:
        """The factors of one module's student, teacher or anchor copy, by parameter name."""
        if which == "student":
            return {k: getattr(pair, k) for k in pair.files}
        if which not in ("teacher", "anchor"):
            raise ValueError(f"LoRA copy must be student, teacher or anchor, got {which!r}")
        return getattr(self, which)[name]

    # --- ComfyUI-layout state dicts ---------------------------------------------------------------------
    def state_dict_comfy(self, which: str = "student", prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
        sd = {}
        for name, pair in self._student_items():
            for k, t in self._weights(name, pair, which).items():
                sd[f"{prefix}{name}.{pair.files[k]}"] = t.detach().clone()
            sd[f"{prefix}{name}.alpha"] = torch.tensor(self.alpha)
        return sd

    @torch.no_grad()
    def load_state_dict_comfy(self, sd: dict[str, torch.Tensor], which: str = "student",
                              prefix: str = COMFY_PREFIX, source: str = "LoRA file") -> None:
        """Load a ComfyUI-layout LoRA. Every target must be present with matching shapes and alpha/rank,
        and no key may be left over: a LoRA that loads partially is an error, never silent."""
        expected = set()
        for name, pair in self._student_items():
            keys = {k: f"{prefix}{name}.{suffix}" for k, suffix in pair.files.items()}
            ka = f"{prefix}{name}.alpha"
            expected |= {*keys.values(), ka}
            if any(key not in sd for key in keys.values()):
                other = next((a for a, c in ADAPTER_CLASSES.items()
                              if all(f"{prefix}{name}.{x}" in sd for x in c.files.values())), None)
                if other:
                    raise DopsdError(f"{source} is a {other} file and this run trains {self.adapter}; use the "
                                     f"adapter it was trained with ({other})")
                raise DopsdError(f"{source} has no {self.adapter} weights for module {name!r}; it was made for "
                                 "another model or another target set (LoRA metadata lists its wrapped modules)")
            dst = self._weights(name, pair, which)
            for k, key in keys.items():
                if tuple(sd[key].shape) != tuple(dst[k].shape):
                    raise DopsdError(f"{source}: module {name!r} has {pair.files[k]} of shape {tuple(sd[key].shape)}, "
                                     f"expected {tuple(dst[k].shape)} (rank {self.rank}); use the rank (and LoKr "
                                     "factor) the file was trained with")
            if ka in sd and not math.isclose(float(sd[ka]), self.alpha, rel_tol=1e-6):
                raise DopsdError(f"{source}: alpha {float(sd[ka])} differs from the configured {self.alpha}")
            for k, key in keys.items():
                dst[k].copy_(sd[key].to(dst[k].dtype))
        extra = sorted(set(sd) - expected)
        if extra:
            raise DopsdError(f"{source} has {len(extra)} keys for modules this model's LoRA does not wrap "
                             f"(e.g. {extra[0]!r}); it was made for another model or target set")


def lora_metadata(lora: LoraSet, **fields) -> dict[str, str]:
    """safetensors metadata (str -> str); lists and dicts are JSON."""
    meta = {"dopsd.rank": str(lora.rank), "dopsd.alpha": str(lora.alpha), "dopsd.adapter": lora.adapter,
            "dopsd.wrapped_modules": json.dumps(lora.targets)}
    if lora.adapter == "lokr":
        meta["dopsd.lokr_factor"] = str(lora.factor)
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
    spec = lora_file_spec(metadata, sd)
    return spec["rank"], spec["alpha"]


def lora_file_spec(metadata: dict[str, str], sd: dict[str, torch.Tensor]) -> dict:
    """rank, alpha, adapter and factor of an adapter file (what add_lora needs to load it), from our
    metadata or, for other trainers' files, from the tensors."""
    if "dopsd.rank" in metadata:
        return {"rank": int(metadata["dopsd.rank"]), "alpha": float(metadata["dopsd.alpha"]),
                "adapter": metadata.get("dopsd.adapter", "lora"), "factor": int(metadata.get("dopsd.lokr_factor", -1))}
    rank_key = {"lora": ".lora_down.weight", "loha": ".hada_w1_b", "lokr": ".lokr_w2_b"}
    for adapter, suffix in rank_key.items():
        t = next((v for k, v in sd.items() if k.endswith(suffix)), None)
        if t is not None:
            alpha_key = next((k for k in sd if k.endswith(".alpha")), None)
            rank = t.shape[0]
            return {"rank": rank, "alpha": float(sd[alpha_key]) if alpha_key else float(rank), "adapter": adapter,
                    "factor": -1}
    raise DopsdError("the file has no lora_down, hada_w1_b or lokr_w2_b keys; it is not a LoRA, LoHa or LoKr file")

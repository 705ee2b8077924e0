"""ComfyUI MODEL -> Denoiser. ComfyUI is imported lazily: importing this module outside ComfyUI works,
using it needs ComfyUI's modules on sys.path.

The adapter calls BaseModel.apply_model (which returns x0, the Denoiser convention) with per-sample
model kwargs built once by BaseModel.extra_conds, hooks the LoRA onto the shared diffusion model for the
duration of training only, and hands the result back through ComfyUI's own patch mechanism.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import DopsdError
from ..lora import LoraSet, find_targets

SUPPORTED = "FLUX.2-klein (4B/9B), Z-Image-Turbo and the built-in D-OPSD toy model"


@dataclass(frozen=True)
class FamilyPreset:
    name: str
    lora_targets: str  # regex over diffusion-model module names (METHOD.md's lists)
    blocks: str  # regex of the transformer blocks checkpointed one by one
    sample_steps: int  # the family's few-step sampling default
    lr: float
    rank: int
    alpha: float
    teacher_suffix: str = ""  # appended to the caption for the teacher (klein's released suffix)


PRESETS = {
    "toy": FamilyPreset("toy", r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", r"blocks\.\d+",
                        sample_steps=4, lr=1e-3, rank=16, alpha=16.0),
    "flux2-klein": FamilyPreset(
        "flux2-klein",
        r"double_blocks\.\d+\.((img_attn|txt_attn)\.(qkv|proj)|(img_mlp|txt_mlp)\.(0|2))|single_blocks\.\d+\.(linear1|linear2)",
        r"(double_blocks|single_blocks)\.\d+", sample_steps=4, lr=2e-5, rank=64, alpha=128.0,
        teacher_suffix=" Make the main subject (facial/ip details), background, and overall composition "
                       "consistent with the reference image."),
    "z-image": FamilyPreset(
        "z-image", r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.(w1|w2|w3))",
        r"(layers|noise_refiner|context_refiner)\.\d+", sample_steps=4, lr=1e-4, rank=64, alpha=128.0),
}
KLEIN_DOUBLE_ONLY = r"double_blocks\.\d+\.((img_attn|txt_attn)\.(qkv|proj)|(img_mlp|txt_mlp)\.(0|2))"


def detect_family(base_model) -> str:
    """The family of a ComfyUI BaseModel, or a clear error naming the supported ones."""
    import comfy.model_base as mb
    name = type(base_model).__name__
    if name == "ToyBaseModel":
        return "toy"
    if isinstance(base_model, getattr(mb, "Flux2", ())):
        return "flux2-klein"
    if isinstance(base_model, getattr(mb, "Lumina2", ())) and base_model.model_config.unet_config.get("z_image_modulation"):
        return "z-image"
    raise DopsdError(f"this MODEL ({name}) has no in-context teacher path D-OPSD can use; supported: {SUPPORTED}")


def make_weights_trainable(module: torch.nn.Module) -> int:
    """Loader nodes run under torch.inference_mode(), so their weights are inference tensors, which
    autograd refuses to save for backward. Re-create each one as a normal tensor, one at a time
    (peak cost: one tensor), values unchanged. Returns how many were replaced."""
    n = 0
    with torch.inference_mode(False):
        for mod in module.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(mod, name, torch.nn.Parameter(p.clone(), requires_grad=False))
                    n += 1
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
                    n += 1
    return n


def sampled_weights_hash(module: torch.nn.Module) -> str:
    """Names, shapes, dtypes and a sample of the values of a module's weights: identifies a model
    without hashing billions of parameters (which would take minutes)."""
    h = hashlib.sha256()
    for i, (name, p) in enumerate(module.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if i % 16 == 0:
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ComfyContext:
    """Model kwargs for BaseModel.apply_model (c_crossattn, ref_latents, ...), batch size 1."""
    kwargs: dict[str, Any] = field(default_factory=dict)


def _cat(values: list):
    first = values[0]
    if torch.is_tensor(first):
        if any(v.shape != first.shape for v in values):
            raise ValueError("contexts of different shapes cannot be batched; use batch size 1 for this dataset")
        return torch.cat(values)
    if isinstance(first, list):
        return [_cat([v[i] for v in values]) for i in range(len(first))]
    return first  # constants (e.g. the reference method string)


class ComfyDenoiser:
    def __init__(self, model_patcher, family: str | None = None, single_blocks: bool = True):
        self.patcher = model_patcher
        self.base = model_patcher.model
        self.dm = self.base.diffusion_model
        self.family = family or detect_family(self.base)
        self.preset = PRESETS[self.family]
        self.targets = self.preset.lora_targets
        if self.family == "flux2-klein" and not single_blocks:
            self.targets = KLEIN_DOUBLE_ONLY
        self.shift = float(getattr(self.base.model_sampling, "shift", 1.0))
        self.latent_shape: tuple[int, ...] | None = None  # set from the dataset (previews)
        self._lora: LoraSet | None = None
        self._ckpt_saved: dict[str, Callable] = {}

    # --- Denoiser interface --------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: ComfyContext) -> torch.Tensor:
        topts = dict(self.patcher.model_options.get("transformer_options", {}))  # DiTs mutate it: fresh copy
        if self.family == "flux2-klein" and torch.is_grad_enabled():
            # FLUX.2 blocks update their hidden states in place (img += ..., x += ...) after autograd saved
            # them. Saving a copy of every activation autograd keeps (tensors that require grad) makes
            # backward work; frozen weights are saved by reference, so the cost is the activations only.
            with torch.autograd.graph.saved_tensors_hooks(_copy_if_grad, _identity):
                return self.base.apply_model(x_t, sigma, transformer_options=topts, **ctx.kwargs)
        return self.base.apply_model(x_t, sigma, transformer_options=topts, **ctx.kwargs)

    def lora(self) -> LoraSet:
        if self._lora is None:
            raise RuntimeError("no LoRA attached; call add_lora() first")
        return self._lora

    def add_lora(self, rank: int, alpha: float, seed: int = 0) -> LoraSet:
        if self._lora is not None:
            self._lora.detach()
        self._lora = LoraSet(self.dm, find_targets(self.dm, self.targets), rank, alpha, seed=seed).attach()
        return self._lora

    def set_checkpointing(self, on: bool) -> None:
        """Per-block activation checkpointing by wrapping each block's forward (undone by release())."""
        if not on:
            self._restore_blocks()
            return
        rx = re.compile(self.preset.blocks)
        # FLUX.2 blocks add into their own inputs in place (img += ..., txt += ..., x += ...). The
        # checkpoint keeps references to the inputs, so its recomputation in backward would start from
        # the already-updated tensors (wrong values; on weights loaded under inference mode it even
        # fails outright: the input then requires grad in recomputation only). Each (re)run gets its
        # own copies of the tensor arguments instead: one activation-sized copy per block.
        copy_inputs = self.family == "flux2-klein"
        for name, mod in self.dm.named_modules():
            if rx.fullmatch(name) and name not in self._ckpt_saved:
                original = mod.forward
                self._ckpt_saved[name] = original
                run = functools.partial(_run_on_copies, original) if copy_inputs else original

                def wrapped(*args, _f=original, _run=run, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_run, *args, use_reentrant=False, **kwargs)
                    return _f(*args, **kwargs)
                mod.forward = wrapped

    def _restore_blocks(self) -> None:
        modules = dict(self.dm.named_modules())
        for name in list(self._ckpt_saved):
            del modules[name].forward  # the instance attribute shadowed the class method
            del self._ckpt_saved[name]

    def release(self) -> None:
        """Remove everything training injected into the shared module (hooks, checkpoint wrappers)."""
        self._restore_blocks()
        if self._lora is not None:
            self._lora.detach()

    def batch_contexts(self, ctxs: list[ComfyContext]) -> ComfyContext:
        keys = ctxs[0].kwargs.keys()
        return ComfyContext({k: _cat([c.kwargs[k] for c in ctxs]) for k in keys})

    def fingerprint(self) -> str:
        return f"{self.family}-{sampled_weights_hash(self.dm)}"

    def sigma_grid(self, steps: int) -> list[float]:
        import comfy.samplers
        if self.family == "flux2-klein":  # the resolution-aware schedule of ComfyUI's Flux2Scheduler node
            from comfy_extras.nodes_flux import get_schedule
            h, w = (self.latent_shape or (128, 64, 64))[-2:]  # latent /16: one token per latent pixel
            sig = get_schedule(steps, round(h * w))
        else:
            sig = comfy.samplers.calculate_sigmas(self.base.model_sampling, "simple", steps)
        return [float(s) for s in sig]

    # --- contexts ------------------------------------------------------------------------------------
    def context(self, cond_tensor: torch.Tensor, cond_extra: dict, latent: torch.Tensor) -> ComfyContext:
        """One CONDITIONING entry -> model kwargs, through the model's own extra_conds (so reference
        latents, padding and attention masks are handled exactly as in sampling)."""
        with torch.inference_mode(False):
            params = dict(cond_extra)
            params.update(cross_attn=cond_tensor.clone(), noise=latent[None], device=latent.device,
                          latent_image=latent[None])
            mc = self.base.extra_conds(**params)
            kwargs = {k: v.process_cond(batch_size=1, area=None).cond for k, v in mc.items()}
        return ComfyContext({k: _clone_tree(v) for k, v in kwargs.items()})


def _run_on_copies(f: Callable, *args, **kwargs):
    """f on copies of its tensor arguments (so in-place updates inside f leave the caller's intact)."""
    args = [a.clone() if torch.is_tensor(a) else a for a in args]
    kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return f(*args, **kwargs)


def _copy_if_grad(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.requires_grad else t


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _clone_tree(v):
    with torch.inference_mode(False):
        if torch.is_tensor(v):
            return v.clone()
        if isinstance(v, list):
            return [_clone_tree(x) for x in v]
        return v


def lora_patches_model(model_patcher, lora_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of the MODEL carrying the LoRA through ComfyUI's own patch mechanism, exactly as the
    stock LoraLoaderModelOnly would apply the same file."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model_patcher, None, lora_sd, strength, 0)[0]

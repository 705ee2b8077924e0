"""ComfyUI MODEL -> Denoiser. ComfyUI is imported lazily: importing this module outside ComfyUI works,
using it needs ComfyUI's modules on sys.path.

The adapter calls BaseModel.apply_model (which returns x0, the Denoiser convention) with per-sample
model kwargs built once by BaseModel.extra_conds, hooks the LoRA onto the shared diffusion model for the
duration of training only, and hands the result back through ComfyUI's own patch mechanism.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..lora import LoraSet, find_targets
from .families import Family, detect_family
from .identity import sampled_weights_hash

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
    def __init__(self, model_patcher, family: Family | None = None):
        self.patcher = model_patcher
        self.base = model_patcher.model
        self.dm = self.base.diffusion_model
        self.fam = family or detect_family(self.base)
        self.family = self.fam.name  # the Denoiser interface's family name (run folders, LoRA metadata)
        self.shift = float(getattr(self.base.model_sampling, "shift", 1.0))
        self._lora: LoraSet | None = None
        self._ckpt_saved: dict[str, Callable] = {}

    # --- Denoiser interface --------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: ComfyContext) -> torch.Tensor:
        topts = dict(self.patcher.model_options.get("transformer_options", {}))  # DiTs mutate it: fresh copy
        if self.fam.in_place_blocks and torch.is_grad_enabled():
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
        self._lora = LoraSet(self.dm, find_targets(self.dm, self.fam.lora_targets), rank, alpha, seed=seed).attach()
        return self._lora

    def set_checkpointing(self, on: bool) -> None:
        """Per-block activation checkpointing by wrapping each block's forward (undone by release())."""
        if not on:
            self._restore_blocks()
            return
        rx = re.compile(self.fam.blocks)
        # FLUX.2 blocks add into their own inputs in place (img += ..., txt += ..., x += ...). The
        # checkpoint keeps references to the inputs, so its recomputation in backward would start from
        # the already-updated tensors (wrong values; on weights loaded under inference mode it even
        # fails outright: the input then requires grad in recomputation only). Each (re)run gets its
        # own copies of the tensor arguments instead: one activation-sized copy per block.
        copy_inputs = self.fam.in_place_blocks
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

    def sigma_grid(self, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        return self.fam.sigma_grid(self.base, steps, latent_shape)

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

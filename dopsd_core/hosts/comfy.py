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
        if torch.is_grad_enabled():
            # FLUX.2 blocks update their hidden states in place (img += ..., x += ...) after autograd saved
            # them. Saving a copy of every activation autograd keeps (tensors that require grad) makes
            # backward work; frozen weights are saved by reference, so the cost is the activations only.
            # Weights ComfyUI casts per forward (an fp8 or bf16 base computed in another dtype: comfy.ops'
            # manual cast) are saved as a recipe and cast again in backward (SavedWeightRecast).
            hooks = SavedWeightRecast(copy_activations=self.fam.in_place_blocks)
            self.recast_stats = hooks
            with hooks.tagging(), torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return self.base.apply_model(x_t, sigma, transformer_options=topts, **ctx.kwargs)
        return self.base.apply_model(x_t, sigma, transformer_options=topts, **ctx.kwargs)

    def lora(self) -> LoraSet:
        if self._lora is None:
            raise RuntimeError("no LoRA attached; call add_lora() first")
        return self._lora

    def add_lora(self, rank: int, alpha: float, seed: int = 0, adapter: str = "lora", factor: int = -1) -> LoraSet:
        if self._lora is not None:
            self._lora.detach()
        self._lora = LoraSet(self.dm, find_targets(self.dm, self.fam.lora_targets), rank, alpha, seed=seed,
                             adapter=adapter, factor=factor).attach()
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


RECAST_SAVED_WEIGHTS = True  # off: autograd keeps every cast weight until backward (the pre-fix behaviour)


@dataclass
class _Recast:
    """What autograd keeps instead of a cast copy of a frozen weight: the module, the cast's dtype and
    device, and the view autograd saved (e.g. the transposed weight of a matmul)."""
    module: Any
    dtype: torch.dtype
    device: torch.device
    shape: tuple
    size: tuple
    stride: tuple
    offset: int


class SavedWeightRecast:
    """saved_tensors_hooks that keep no cast copies of frozen base weights for backward.

    ComfyUI computes a base stored in another dtype (fp8 weight_dtype, a pre-quantized fp8 file, a bf16
    base on a device without bf16 compute) by casting each Linear's weight per forward (comfy.ops
    cast_bias_weight). Autograd saves that cast copy for the input gradient, so without checkpointing a
    training forward held a second, wider copy of every weight until backward: for klein-4B on the CPU
    (bf16 stored, fp32 compute) 15.5 GB on top of the 7.75 GB base, which ran a 24 GB machine out of memory
    (docs/logs/full_size_klein-4b.txt); on a GPU with an fp8 base, a bf16 copy (7.75 GB for klein-4B).
    Here each cast copy is tagged when it is made (only while this is active) and saved as a recipe that
    casts the stored weight again in backward, bit for bit the same tensor. Weights used as stored (no
    cast) are saved by reference anyway; checkpointed blocks use torch's own hooks."""

    def __init__(self, copy_activations: bool):
        self.copy_activations = copy_activations
        self.packed = 0  # cast weights saved as recipes
        self.recast = 0  # recipes cast again in backward

    def tagging(self):
        import contextlib

        import comfy.ops
        original = comfy.ops.cast_bias_weight

        @contextlib.contextmanager
        def ctx():
            if not RECAST_SAVED_WEIGHTS or getattr(original, "_dopsd_tagging", False):
                yield
                return

            def tagged(s, *args, **kwargs):
                out = original(s, *args, **kwargs)
                w = out[0]
                stored = getattr(s, "weight", None)
                if torch.is_tensor(w) and w is not stored and not w.requires_grad and torch.is_grad_enabled() \
                        and not getattr(stored, "requires_grad", True):
                    w._dopsd_recast = (s, w.dtype, w.device)
                return out
            tagged._dopsd_tagging = True
            comfy.ops.cast_bias_weight = tagged
            try:
                yield
            finally:
                comfy.ops.cast_bias_weight = original
        self._original = original
        return ctx()

    def pack(self, t: torch.Tensor):
        src = t if hasattr(t, "_dopsd_recast") else t._base if t._base is not None and hasattr(t._base, "_dopsd_recast") else None
        if src is not None and src.is_contiguous():
            module, dtype, device = src._dopsd_recast
            self.packed += 1
            return _Recast(module, dtype, device, tuple(src.shape), tuple(t.size()), tuple(t.stride()),
                           t.storage_offset() - src.storage_offset())
        if self.copy_activations and t.requires_grad:
            return t.clone()
        return t

    def unpack(self, x):
        if isinstance(x, _Recast):
            with torch.no_grad():
                w = self._original(x.module, dtype=x.dtype, device=x.device, bias_dtype=x.dtype)[0].contiguous()
            if tuple(w.shape) != x.shape:
                raise RuntimeError(f"cast weight of {type(x.module).__name__} changed shape in backward")
            self.recast += 1
            return w.as_strided(x.size, x.stride, w.storage_offset() + x.offset)
        return x


def _run_on_copies(f: Callable, *args, **kwargs):
    """f on copies of its tensor arguments (so in-place updates inside f leave the caller's intact)."""
    args = [a.clone() if torch.is_tensor(a) else a for a in args]
    kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    return f(*args, **kwargs)


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


def sample_latents(model_patcher, contexts: list, latent_shape: tuple, steps: int, seed: int) -> torch.Tensor:
    """Few-step Euler samples on the family's grid from one seed, in the VAE's latent space (as KSampler
    returns them): what the sampler nodes and the CLI show."""
    import comfy.model_management as mm

    from ..denoiser import sample
    mm.load_models_gpu([model_patcher])  # applies the MODEL's own patches (e.g. a LoRA) to the shared weights
    den = ComfyDenoiser(model_patcher)
    x0 = sample(den, den.batch_contexts(contexts), (len(contexts), *latent_shape),
                den.sigma_grid(steps, tuple(latent_shape)), torch.Generator().manual_seed(seed),
                device=mm.get_torch_device())
    return model_patcher.model.process_latent_out(x0).cpu()

"""Random-weight models with the real layer shapes of FLUX.2-klein 4B/9B and Z-Image-Turbo, for bench/.

Our own modules (no ComfyUI needed, so they run on the GPU machine's plain PyTorch). Module names follow
ComfyUI's (`double_blocks.N.img_attn.qkv`, `layers.N.attention.qkv`, ...), so the LoRA targets are the
family presets of dopsd_core.hosts.comfy and the LoRA sizes are the real ones. Every Linear has the
shape of the real checkpoint's; what is simplified does not change the cost much: no RoPE (elementwise),
the timestep / modulation embedders are plain MLPs, klein's reference latent is appended to the image
tokens as in its `index` reference method.

Shapes (ComfyUI 0.18.1 comfy/model_detection.py + comfy/ldm/{flux,lumina}/model.py, checkpoint key shapes):
  klein-4B: hidden 3072, 24 heads, 5 double + 20 single blocks, MLP ratio 3 (gated SiLU), latent 128 ch
            at /16, text = Qwen3-4B layers 9/18/27 concatenated (7680)
  klein-9B: hidden 4096, 32 heads, 8 double + 24 single blocks, otherwise as 4B, text Qwen3-8B (12288)
  Z-Image:  dim 3840, 30 heads, 30 layers + 2 noise-refiner + 2 context-refiner, FFN 10240 (SwiGLU),
            latent 16 ch at /8 with patch 2, caption features Qwen3-4B (2560)

Base weights can be fp32, bf16, or stored as fp8 (e4m3) and cast to bf16 inside each Linear; the fp8
Linear's backward re-casts the stored weight instead of keeping a bf16 copy alive until backward.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dopsd_core.hosts.families import family_named
from dopsd_core.lora import LoraSet, find_targets
from dopsd_core.schedule import comfy_simple_sigmas


def run_block(checkpointing: bool, block, *args):
    """One block, with per-block gradient checkpointing when asked and gradients are on."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


@dataclass(frozen=True)
class Spec:
    family: str  # dopsd family name (LoRA target preset)
    kind: str  # "flux2" or "nextdit"
    hidden: int
    heads: int
    depth: int  # double blocks (flux2) / main layers (nextdit)
    depth_single: int  # single blocks (flux2) / refiner layers each (nextdit)
    context_dim: int
    latent_channels: int
    downsample: int  # pixels per latent pixel
    patch: int
    mlp_hidden: int
    teacher_extra_tokens: int  # klein: reference latent tokens (= image tokens); Z-Image: VL image tokens


SPECS = {
    "klein4b": Spec("flux2-klein", "flux2", 3072, 24, 5, 20, 7680, 128, 16, 1, 9216, -1),
    "klein9b": Spec("flux2-klein", "flux2", 4096, 32, 8, 24, 12288, 128, 16, 1, 12288, -1),
    "zimage": Spec("z-image", "nextdit", 3840, 30, 30, 2, 2560, 16, 8, 2, 10240, 768),
}


class CastLinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with W stored in another dtype (fp8) and cast per call. Saves only the stored
    weight: the base is frozen, so backward needs W (re-cast) and not x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Linear(nn.Module):
    def __init__(self, i: int, o: int, bias: bool = False, store=torch.float32, compute=torch.float32, device=None):
        super().__init__()
        self.compute = compute
        w = torch.empty(o, i, device=device, dtype=compute if compute != store else store)
        if w.device.type != "meta":
            w.normal_(0.0, 0.5 / math.sqrt(i))
        self.weight = nn.Parameter(w.to(store), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(o, device=device, dtype=compute), requires_grad=False) if bias else None

    def forward(self, x):
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return CastLinearFn.apply(x, self.weight, self.bias)


def rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


def ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],))


def attend(q, k, v, heads):  # [B, L, D] x3 -> [B, L, D], with per-head RMS q/k norm as both families use
    B, L, D = q.shape
    q, k, v = (t.view(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(rms(q), rms(k), v)
    return o.transpose(1, 2).reshape(B, L, D)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class Attn(nn.Module):
    def __init__(self, h, mk, qkv="qkv", out="proj"):
        super().__init__()
        setattr(self, qkv, mk(h, 3 * h))
        setattr(self, out, mk(h, h))
        self._names = (qkv, out)


class Mlp(nn.Sequential):  # indices 0 and 2, as ComfyUI's img_mlp / txt_mlp
    def __init__(self, h, m, mk):
        super().__init__(mk(h, 2 * m), nn.Identity(), mk(m, h))

    def forward(self, x):
        a, b = self[0](x).chunk(2, dim=-1)
        return self[2](F.silu(a) * b)


class DoubleBlock(nn.Module):
    def __init__(self, s: Spec, mk):
        super().__init__()
        self.heads = s.heads
        self.img_attn, self.txt_attn = Attn(s.hidden, mk), Attn(s.hidden, mk)
        self.img_mlp, self.txt_mlp = Mlp(s.hidden, s.mlp_hidden, mk), Mlp(s.hidden, s.mlp_hidden, mk)

    def forward(self, img, txt, mod_img, mod_txt):
        (s1, c1, g1, s2, c2, g2), (t1, d1, h1, t2, d2, h2) = mod_img, mod_txt
        qi, ki, vi = self.img_attn.qkv(ln(img) * (1 + c1) + s1).chunk(3, dim=-1)
        qt, kt, vt = self.txt_attn.qkv(ln(txt) * (1 + d1) + t1).chunk(3, dim=-1)
        o = attend(torch.cat([qt, qi], 1), torch.cat([kt, ki], 1), torch.cat([vt, vi], 1), self.heads)
        ot, oi = o[:, :txt.shape[1]], o[:, txt.shape[1]:]
        img = img + g1 * self.img_attn.proj(oi)
        txt = txt + h1 * self.txt_attn.proj(ot)
        img = img + g2 * self.img_mlp(ln(img) * (1 + c2) + s2)
        txt = txt + h2 * self.txt_mlp(ln(txt) * (1 + d2) + t2)
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, s: Spec, mk):
        super().__init__()
        self.heads, self.h, self.m = s.heads, s.hidden, s.mlp_hidden
        self.linear1 = mk(s.hidden, 3 * s.hidden + 2 * s.mlp_hidden)  # fused qkv + gated MLP in
        self.linear2 = mk(s.hidden + s.mlp_hidden, s.hidden)  # fused attention out + MLP out

    def forward(self, x, mod):
        shift, scale, gate = mod
        qkv, mlp = self.linear1(ln(x) * (1 + scale) + shift).split([3 * self.h, 2 * self.m], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        a, b = mlp.chunk(2, dim=-1)
        return x + gate * self.linear2(torch.cat([attend(q, k, v, self.heads), F.silu(a) * b], -1))


class Flux2Like(nn.Module):
    def __init__(self, s: Spec, mk):
        super().__init__()
        self.s = s
        h = s.hidden
        self.img_in, self.txt_in = mk(s.latent_channels, h), mk(s.context_dim, h)
        self.time_in = nn.Sequential(mk(256, h), nn.SiLU(), mk(h, h))
        self.double_stream_modulation_img, self.double_stream_modulation_txt = mk(h, 6 * h), mk(h, 6 * h)
        self.single_stream_modulation = mk(h, 3 * h)
        self.double_blocks = nn.ModuleList(DoubleBlock(s, mk) for _ in range(s.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(s, mk) for _ in range(s.depth_single))
        self.final_mod, self.final = mk(h, 2 * h), mk(h, s.latent_channels)
        self.checkpointing = False

    def _run(self, block, *args):
        return run_block(self.checkpointing, block, *args)

    def forward(self, x, sigma, text, ref=None):
        B, C, H, W = x.shape
        img = x.flatten(2).transpose(1, 2)  # patch 1: one token per latent pixel
        n_img = img.shape[1]
        if ref is not None:
            img = torch.cat([img, ref.flatten(2).transpose(1, 2).to(img.dtype)], 1)
        img, txt = self.img_in(img), self.txt_in(text.to(img.dtype))
        vec = self.time_in(timestep_embedding(sigma).to(img.dtype))[:, None]
        fv = F.silu(vec)
        mi = self.double_stream_modulation_img(fv).chunk(6, dim=-1)
        mt = self.double_stream_modulation_txt(fv).chunk(6, dim=-1)
        ms = self.single_stream_modulation(fv).chunk(3, dim=-1)
        for blk in self.double_blocks:
            img, txt = self._run(blk, img, txt, mi, mt)
        z = torch.cat([txt, img], 1)
        for blk in self.single_blocks:
            z = self._run(blk, z, ms)
        img = z[:, txt.shape[1]:txt.shape[1] + n_img]
        shift, scale = self.final_mod(fv).chunk(2, dim=-1)
        out = self.final(ln(img) * (1 + scale) + shift)
        return out.transpose(1, 2).reshape(B, C, H, W)


class NextBlock(nn.Module):
    def __init__(self, s: Spec, mk, modulation: bool):
        super().__init__()
        self.heads = s.heads
        self.attention = Attn(s.hidden, mk, "qkv", "out")
        self.feed_forward = nn.Module()
        self.feed_forward.w1, self.feed_forward.w3 = mk(s.hidden, s.mlp_hidden), mk(s.hidden, s.mlp_hidden)
        self.feed_forward.w2 = mk(s.mlp_hidden, s.hidden)
        self.adaLN_modulation = mk(256, 4 * s.hidden) if modulation else None

    def forward(self, x, t):
        if self.adaLN_modulation is not None:
            sa, ga, sm, gm = self.adaLN_modulation(t).chunk(4, dim=-1)
            ga, gm = torch.tanh(ga), torch.tanh(gm)
        else:
            sa = sm = torch.zeros((), dtype=x.dtype, device=x.device)
            ga = gm = torch.ones((), dtype=x.dtype, device=x.device)
        q, k, v = self.attention.qkv(rms(x) * (1 + sa)).chunk(3, dim=-1)
        x = x + ga * rms(self.attention.out(attend(q, k, v, self.heads)))
        h = rms(x) * (1 + sm)
        ff = self.feed_forward
        return x + gm * rms(ff.w2(F.silu(ff.w1(h)) * ff.w3(h)))


class NextDiTLike(nn.Module):
    def __init__(self, s: Spec, mk):
        super().__init__()
        self.s = s
        p = s.patch
        self.x_embedder = mk(p * p * s.latent_channels, s.hidden)
        self.cap_embedder = nn.Sequential(nn.Identity(), mk(s.context_dim, s.hidden))
        self.t_embedder = nn.Sequential(mk(256, 256), nn.SiLU(), mk(256, 256))
        self.noise_refiner = nn.ModuleList(NextBlock(s, mk, True) for _ in range(s.depth_single))
        self.context_refiner = nn.ModuleList(NextBlock(s, mk, False) for _ in range(s.depth_single))
        self.layers = nn.ModuleList(NextBlock(s, mk, True) for _ in range(s.depth))
        self.final_mod, self.final = mk(256, s.hidden), mk(s.hidden, p * p * s.latent_channels)
        self.checkpointing = False

    def _run(self, block, *args):
        return run_block(self.checkpointing, block, *args)

    def forward(self, x, sigma, text, ref=None):
        B, C, H, W = x.shape
        p = self.s.patch
        tok = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), -1)
        img = self.x_embedder(tok)
        cap = self.cap_embedder(rms(text.to(img.dtype)))
        t = self.t_embedder(timestep_embedding(1.0 - sigma).to(img.dtype))[:, None]
        for blk in self.noise_refiner:
            img = self._run(blk, img, t)
        for blk in self.context_refiner:
            cap = self._run(blk, cap, t)
        z = torch.cat([cap, img], 1)
        for blk in self.layers:
            z = self._run(blk, z, t)
        img = z[:, cap.shape[1]:]
        out = self.final(rms(img) * (1 + self.final_mod(F.silu(t))))
        out = out.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, C, H, W)


@dataclass
class BenchContext:
    text: torch.Tensor  # [B, L, context_dim]
    ref: torch.Tensor | None = None  # klein teacher: the target latent as a reference


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp8": (torch.float8_e4m3fn, torch.bfloat16)}


def build_model(name: str, dtype: str = "fp32", depth: int | None = None, device="cpu") -> nn.Module:
    """depth: None = the real block counts; n = n double + n single blocks (klein) or n layers and
    min(n, 2) refiner layers each (Z-Image), every layer at full width."""
    s = SPECS[name]
    if depth is not None:
        s = Spec(**{**s.__dict__, "depth": depth, "depth_single": depth if s.kind == "flux2" else min(depth, 2)})
    store, compute = DTYPES[dtype]

    def mk(i, o):
        return Linear(i, o, store=store, compute=compute, device=device)
    torch.manual_seed(0)
    model = (Flux2Like if s.kind == "flux2" else NextDiTLike)(s, mk)
    return model.eval().requires_grad_(False)


class ShapesDenoiser:
    """The Denoiser interface over a same-shape model (x0 = x - sigma * v)."""
    shift = 3.0
    train_shift = 3.0

    def __init__(self, name: str, model: nn.Module, resolution: int, lora_dtype: torch.dtype):
        self.name, self.model = name, model
        self.spec: Spec = model.s
        self.family = self.spec.family
        self.compute = DTYPES_BY_MODEL(model)
        side = resolution // self.spec.downsample
        self.latent_shape = (self.spec.latent_channels, side, side)
        self.lora_dtype = lora_dtype
        self._lora: LoraSet | None = None

    def denoise(self, x_t, sigma, ctx: BenchContext):
        v = self.model(x_t.to(self.compute), sigma, ctx.text, ctx.ref)
        return x_t - sigma.reshape(-1, 1, 1, 1).to(x_t.dtype) * v.to(x_t.dtype)

    def lora(self) -> LoraSet:
        return self._lora

    def add_lora(self, rank: int, alpha: float, seed: int = 0, adapter: str = "lora", factor: int = -1) -> LoraSet:
        targets = find_targets(self.model, family_named(self.family).lora_targets)
        self._lora = LoraSet(self.model, targets, rank, alpha, seed=seed, dtype=self.lora_dtype, adapter=adapter,
                             factor=factor).attach()
        return self._lora

    def set_checkpointing(self, on: bool) -> None:
        self.model.checkpointing = bool(on)

    def batch_contexts(self, ctxs):
        return BenchContext(torch.cat([c.text for c in ctxs]),
                            None if ctxs[0].ref is None else torch.cat([c.ref for c in ctxs]))

    def fingerprint(self) -> str:
        return "bench-" + hashlib.sha256(repr(self.spec).encode()).hexdigest()[:12]

    def sigma_grid(self, steps: int, latent_shape: tuple[int, ...] | None = None) -> list[float]:
        return comfy_simple_sigmas(self.shift, steps)

    def teacher_context(self, text: torch.Tensor, x0: torch.Tensor, gen: torch.Generator) -> BenchContext:
        return teacher_context(self.spec, text, x0, gen)


def teacher_context(spec: Spec, text: torch.Tensor, x0: torch.Tensor, gen: torch.Generator) -> BenchContext:
    """Random stand-ins with the teacher's real lengths. klein: caption + the released suffix (24 more
    tokens) and the target as a reference latent; Z-Image: a Qwen3-VL feature of [image, caption]."""
    if spec.kind == "flux2":
        suffix = torch.randn(1, 24, text.shape[-1], generator=gen).to(text)
        return BenchContext(torch.cat([text, suffix], 1), x0[None])
    n = min(1024, text.shape[1] + spec.teacher_extra_tokens)
    return BenchContext(torch.randn(1, n, text.shape[-1], generator=gen).to(text))


def DTYPES_BY_MODEL(model: nn.Module) -> torch.dtype:
    lin = next(m for m in model.modules() if isinstance(m, Linear))
    return lin.compute


def count_bytes(name: str, dtype: str, rank: int) -> dict:
    """Computed (not measured) sizes of the full-size model, on the meta device: base weights, LoRA
    parameters, and LoRA + gradient + optimizer-state bytes for AdamW and 8-bit AdamW."""
    model = build_model(name, dtype, None, device="meta")
    n_base = sum(p.numel() for p in model.parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mods = dict(model.named_modules())
    targets = find_targets(model, family_named(SPECS[name].family).lora_targets)
    n_lora = sum(rank * (mods[t].weight.shape[0] + mods[t].weight.shape[1]) for t in targets)
    lora_b = 2 if dtype in ("bf16", "fp8") else 4
    return {"base_params": n_base, "base_weight_bytes": base_bytes, "lora_modules": len(targets),
            "lora_params": n_lora, "lora_param_bytes": n_lora * lora_b, "lora_grad_bytes": n_lora * lora_b,
            # student + EMA teacher copy
            "lora_teacher_bytes": n_lora * lora_b,
            "adamw_state_bytes": n_lora * 2 * lora_b, "adamw8bit_state_bytes": int(n_lora * 2.04)}

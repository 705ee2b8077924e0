"""ToyDiT: a miniature single-stream flow-matching DiT with the interface of a real turbo model.

Sequence = [text tokens | image tokens | optional reference-image tokens]; the timestep and the mean of
the text tokens enter through adaLN modulation; the output is the velocity v = eps - x0 on the image tokens. The "VAE" is the
identity: a latent is the RGB image scaled to [-1, 1], patchified 4x4 inside the model.

forward(x, timesteps, context, ref_latents=None, **kwargs) matches the calling convention of
ComfyUI's diffusion models, so the same module can be wrapped as a ComfyUI MODEL.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ToyConfig:
    image_size: int = 32
    channels: int = 3
    patch: int = 4
    width: int = 160
    depth: int = 5
    heads: int = 5
    mlp_ratio: int = 4
    context_dim: int = 64  # text-encoder output width
    text_depth: int = 2
    pooled_text: bool = True  # caption summary in the adaLN vector (as DiT's class label, SD3's pooled text)
    # What the last layer predicts. "x0": the clean image (forward still returns v, as ComfyUI's flow
    # models do). A tiny DiT predicting v must carry the noise through its residual stream and left
    # speckle in its samples (runs 1-5); predicting the clean image avoids that (Li & He 2025, "Back to
    # Basics: Let Denoising Generative Models Denoise").
    prediction: str = "v"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


X0_SIGMA_MIN = 0.05


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [side*side, dim] (as in DiT): unit-scale values, so positions
    are as loud as content from the first step (a 0.02-scale learned table left a tiny DiT unable to
    place shapes or copy a reference after thousands of steps)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        args = coord[:, None] * freqs[None]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of sigma in [0, 1] (scaled by 1000 so low frequencies resolve it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, linear=nn.Linear):
        super().__init__()
        self.heads = heads
        self.qkv = linear(width, 3 * width)
        self.proj = linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, width: int, ratio: int, linear=nn.Linear):
        super().__init__()
        self.fc1 = linear(width, width * ratio)
        self.fc2 = linear(width * ratio, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation from the timestep embedding."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, linear=nn.Linear):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, linear)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_ratio, linear)
        self.adaLN = linear(width, 6 * width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c))[:, None].chunk(6, dim=-1)
        h = h + gate1 * self.attn(self.norm1(h) * (1 + scale1) + shift1)
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


class ToyDiT(nn.Module):
    def __init__(self, cfg: ToyConfig | None = None, *, device=None, dtype=None, operations=None, **fields):
        """cfg, or its fields as keyword arguments (how ComfyUI's BaseModel builds a diffusion model:
        unet_model(**unet_config, device=..., operations=...)); `operations` supplies the Linear class."""
        super().__init__()
        cfg = cfg or ToyConfig(**fields)
        self.cfg = cfg
        self.dtype = dtype or torch.float32  # ComfyUI's BaseModel.get_dtype() reads this
        d, patch_dim = cfg.width, cfg.channels * cfg.patch**2
        base_linear = operations.Linear if operations is not None else nn.Linear

        def linear(i, o):
            return base_linear(i, o, device=device, dtype=dtype)
        self.img_in = linear(patch_dim, d)
        self.pos = nn.Parameter(torch.randn(cfg.tokens, d, device=device, dtype=dtype) * 0.02)
        self.ref_type = nn.Parameter(torch.randn(d, device=device, dtype=dtype) * 0.02)  # marks reference tokens
        self.txt_in = linear(cfg.context_dim, d)
        self.t_embedder = nn.Sequential(linear(d, d), nn.SiLU(), linear(d, d))
        # Attention alone taught shape words very slowly (blobs after 12k steps): a pooled caption in the
        # modulation reaches every image token at every block, so "square" vs "circle" acts at once.
        self.txt_pool = nn.Sequential(linear(cfg.context_dim, d), nn.SiLU(), linear(d, d)) if cfg.pooled_text else None
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, linear) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = linear(d, 2 * d)
        self.final = linear(d, patch_dim)
        self.gradient_checkpointing = False
        if operations is None:  # ComfyUI's ops skip init: their weights are loaded right after
            self.init_weights()

    def init_weights(self, gate_std: float = 0.0) -> None:
        """adaLN-zero init (gate_std=0). A non-zero gate_std gives random models whose LoRA gradients
        are non-zero (with zero gates and LoRA B = 0 every LoRA gradient is exactly 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos.copy_(sincos_2d(self.cfg.image_size // self.cfg.patch, self.cfg.width))
            nn.init.normal_(self.ref_type, std=0.5)
        for m in [b.adaLN for b in self.blocks] + [self.final_adaLN, self.final]:
            nn.init.normal_(m.weight, std=gate_std) if gate_std > 0 else nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, N, C*p*p]
        p = self.cfg.patch
        return rearrange(img, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p, side = self.cfg.patch, self.cfg.image_size // self.cfg.patch
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=side, w=side, p=p, q=p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                ref_latents=None, **kwargs) -> torch.Tensor:
        """x: [B, C, H, W] noisy latent; timesteps: [B] sigma; context: [B, L, context_dim];
        ref_latents: None, a [B, C, H, W] tensor or a one-element list of it. Returns v: [B, C, H, W]."""
        if isinstance(ref_latents, (list, tuple)):
            if len(ref_latents) != 1:
                raise ValueError(f"the toy model takes one reference image, got {len(ref_latents)}")
            ref_latents = ref_latents[0]
        n_img = self.cfg.tokens
        img = self.img_in(self.patchify(x)) + self.pos
        parts = [self.txt_in(context), img]
        if ref_latents is not None:
            parts.append(self.img_in(self.patchify(ref_latents.to(x.dtype))) + self.pos + self.ref_type)
        h = torch.cat(parts, dim=1)
        c = self.t_embedder(timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]), self.cfg.width).to(h.dtype))
        if self.txt_pool is not None:
            c = c + self.txt_pool(context.mean(dim=1))
        n_txt = context.shape[1]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        shift, scale = self.final_adaLN(F.silu(c))[:, None].chunk(2, dim=-1)
        out = self.unpatchify(self.final(self.final_norm(h[:, n_txt:n_txt + n_img]) * (1 + scale) + shift))
        if self.cfg.prediction == "x0":  # v = (x_t - x0) / sigma, sigma clipped so that v stays finite near 0
            sigma = timesteps.reshape(-1, 1, 1, 1).to(out.dtype).clamp(min=X0_SIGMA_MIN)
            return (x - out) / sigma
        return out

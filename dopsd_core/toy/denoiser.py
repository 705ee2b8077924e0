"""The built-in toy model as a Denoiser: ToyDiT + ToyTextEncoder + identity "VAE"."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..denoiser import Record
from ..errors import DopsdError
from ..fileio import load_tensors, save_tensors
from ..family_spec import TOY
from ..lora import LoraSet, find_targets
from ..schedule import comfy_simple_sigmas
from .model import ToyConfig, ToyDiT
from .text import ToyTextEncoder

log = logging.getLogger("dopsd.toy")

WEIGHTS_DIR = Path(__file__).parent / "weights"
BASE_WEIGHTS = WEIGHTS_DIR / "toy_base.safetensors"  # the 4-step distilled turbo model
SHIFT = 3.0  # flow shift of the toy: ComfyUI's `simple` scheduler at 4 steps gives 1, .9, .75, .5, 0
TRAIN_SHIFT = 3.0  # logit-normal shift of the base's training sigmas (experiments/toy/lab/pretrain.py says why)
EMPTY_CAPTION = ""  # the unconditional prompt of classifier-free guidance (trained by the lab's pretrain.py)
LORA_TARGETS = TOY.lora_targets  # the family spec's


@dataclass
class ToyContext:
    text: torch.Tensor  # [B, L, context_dim] float embeddings from the text encoder
    ref: torch.Tensor | None = None  # [B, C, H, W] reference latent (the teacher's image in context)


def image_to_latent(image: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> latent in [-1, 1] (the toy's VAE is the identity)."""
    return image * 2.0 - 1.0


def latent_to_image(latent: torch.Tensor) -> torch.Tensor:
    return ((latent + 1.0) / 2.0).clamp(0.0, 1.0)


class ToyDenoiser:
    family = "toy"
    shift = SHIFT  # sampling shift (the grid)
    train_shift = TRAIN_SHIFT  # the base's training sigma distribution, which SFT reuses

    def __init__(self, dit: ToyDiT, text_encoder: ToyTextEncoder, device: str | torch.device = "cpu"):
        self.dit = dit.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.cfg: ToyConfig = dit.cfg
        self.device = torch.device(device)
        self._lora: LoraSet | None = None

    # --- Denoiser interface ---------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: ToyContext) -> torch.Tensor:
        v = self.dit(x_t, sigma, ctx.text, ref_latents=ctx.ref)
        return x_t - sigma.reshape(-1, 1, 1, 1).to(x_t.dtype) * v

    def lora(self) -> LoraSet:
        if self._lora is None:
            raise RuntimeError("no LoRA attached; call add_lora() first")
        return self._lora

    def add_lora(self, rank: int, alpha: float, seed: int = 0, adapter: str = "lora", factor: int = -1,
                 targets: str = LORA_TARGETS) -> LoraSet:
        if self._lora is not None:
            self._lora.detach()
        self._lora = LoraSet(self.dit, find_targets(self.dit, targets), rank, alpha, seed=seed, adapter=adapter,
                             factor=factor).attach()
        return self._lora

    def set_checkpointing(self, on: bool) -> None:
        self.dit.gradient_checkpointing = bool(on)

    def batch_contexts(self, ctxs: list[ToyContext]) -> ToyContext:
        refs = [c.ref for c in ctxs]
        if any(r is None for r in refs) and not all(r is None for r in refs):
            raise ValueError("cannot batch contexts with and without a reference image")
        return ToyContext(torch.cat([c.text for c in ctxs]),
                          None if refs[0] is None else torch.cat(refs))

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for module in (self.dit, self.text_encoder):
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return "toy-" + h.hexdigest()[:16]

    # --- toy-specific helpers -----------------------------------------------------------------------
    def sigma_grid(self, steps: int, latent_shape: tuple[int, ...] | None = None) -> list[float]:
        """ComfyUI's `simple` schedule at the toy's shift; one image size, so latent_shape is unused."""
        return comfy_simple_sigmas(self.shift, steps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)

    @property
    def resolution(self) -> int:
        return self.cfg.image_size

    def encode_prompt(self, caption: str) -> ToyContext:
        return ToyContext(self.text_encoder.encode([caption]))

    def build_records(self, items) -> list[Record]:
        """items: data.ImageItem list (image [3, H, W] in [0, 1], caption variants)."""
        records = []
        for item in items:
            x0 = image_to_latent(item.image).to(self.device)
            text = self.text_encoder.encode(item.captions)  # [V, L, D]: one row per caption variant
            records.append(Record(
                name=item.name, x0=x0, captions=list(item.captions),
                student_ctx=[ToyContext(text[i:i + 1]) for i in range(len(item.captions))],
                teacher_ctx=[ToyContext(text[i:i + 1], x0[None]) for i in range(len(item.captions))],
            ))
        return records

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, C, H, W] -> images [B, H, W, 3] in [0, 1] (ComfyUI IMAGE layout)."""
        return latent_to_image(latent).permute(0, 2, 3, 1).cpu()


class Guided:
    """A toy denoiser sampled with classifier-free guidance on x0 (linear in v as well):
    x0_u + w (x0_c - x0_u); the unconditional context is the empty caption without a reference."""

    def __init__(self, den: ToyDenoiser, guidance: float):
        self.den, self.guidance = den, guidance
        self.empty = den.text_encoder.encode([EMPTY_CAPTION])  # [1, L, D]

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, ctx: ToyContext) -> torch.Tensor:
        x0_c = self.den.denoise(x_t, sigma, ctx)
        if self.guidance == 1.0:
            return x0_c
        x0_u = self.den.denoise(x_t, sigma, ToyContext(self.empty.expand(x_t.shape[0], -1, -1)))
        return x0_u + self.guidance * (x0_c - x0_u)

    def __getattr__(self, name):  # everything else (grid, text encoder, shapes) is the wrapped model's
        return getattr(self.den, name)


def random_toy(cfg: ToyConfig = ToyConfig(), seed: int = 0, gate_std: float = 0.02,
               device: str = "cpu") -> ToyDenoiser:
    """A random-weight toy. gate_std > 0 so that LoRA gradients are non-zero from step 0."""
    torch.manual_seed(seed)
    dit = ToyDiT(cfg)
    dit.init_weights(gate_std=gate_std)
    te = ToyTextEncoder(cfg.context_dim, cfg.text_depth)
    return ToyDenoiser(dit, te, device)


def save_toy(denoiser: ToyDenoiser, path: Path, **meta) -> None:
    sd = {f"diffusion_model.{k}": v for k, v in denoiser.dit.state_dict().items()}
    sd.update({f"text_encoder.{k}": v for k, v in denoiser.text_encoder.state_dict().items()})
    metadata = {"dopsd.toy_config": json.dumps(denoiser.cfg.to_dict())}
    metadata.update({f"dopsd.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    save_tensors(sd, path, metadata)


def load_toy_file(path: Path, device: str = "cpu") -> ToyDenoiser:
    path = Path(path)
    if not path.is_file():
        raise DopsdError(f"toy weights {path} not found; pass another file, or train them in a git checkout with "
                         "`python -m experiments.toy.lab toy-pretrain` and `toy-distill`")
    sd, meta = load_tensors(path)
    cfg = ToyConfig(**json.loads(meta["dopsd.toy_config"]))
    dit, te = ToyDiT(cfg), ToyTextEncoder(cfg.context_dim, cfg.text_depth)
    dit.load_state_dict({k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")})
    te.load_state_dict({k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")})
    return ToyDenoiser(dit, te, device)


def load_toy(device: str = "cpu", weights: Path | None = None) -> ToyDenoiser:
    """The built-in toy: the shipped trained weights when present, else a seeded random model."""
    path = Path(weights) if weights else BASE_WEIGHTS
    if path.is_file() or weights:
        return load_toy_file(path, device)
    log.warning("no trained toy weights at %s: using a random-weight toy model (samples are noise)", path)
    return random_toy(device=device)

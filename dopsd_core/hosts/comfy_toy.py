"""The built-in toy model as real ComfyUI objects: a BaseModel with a discrete-flow (CONST) model
sampling, shift 3, a 3-channel identity latent format, and float text conditioning.

Only imported inside ComfyUI (imports comfy at module level)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

from ..errors import DopsdError
from ..fileio import load_tensors
from ..toy.denoiser import BASE_WEIGHTS, SHIFT
from ..toy.model import ToyConfig, ToyDiT
from ..toy.text import ToyTextEncoder


class ToyLatentFormat(comfy.latent_formats.LatentFormat):
    """The toy's 'VAE' is the identity: a latent is the RGB image scaled to [-1, 1]."""
    latent_channels = 3
    spacial_downscale_ratio = 1
    scale_factor = 1.0

    def __init__(self):
        # RGB preview of a latent: ((l + 1) / 2) as a linear map from the 3 channels
        self.latent_rgb_factors = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]
        self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]


class ToyModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "dopsd_toy"}
    unet_extra_config = {}
    sampling_settings = {"shift": SHIFT, "multiplier": 1.0}
    latent_format = ToyLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0

    def __init__(self, cfg: ToyConfig):
        super().__init__({"cfg": cfg})
        self.set_inference_dtype(torch.float32, None)

    def get_model(self, state_dict=None, prefix="", device=None):
        return ToyBaseModel(self, device=device)


class ToyBaseModel(comfy.model_base.BaseModel):
    """ComfyUI calls diffusion_model(x, t, context=..., ref_latents=...); t = sigma (multiplier 1)."""

    def __init__(self, model_config: ToyModelConfig, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ToyDiT)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:  # fixed-length toy text: plain concat, no LCM padding
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        refs = kwargs.get("reference_latents")
        if refs is not None:
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(r) for r in refs])
        return out


class ToyTextEncoderHandle:
    """The TOY_TEXT_ENCODER type: encodes captions to CONDITIONING [[embedding [1, L, D], {}]]."""

    def __init__(self, encoder: ToyTextEncoder):
        self.encoder = encoder

    def encode(self, text: str):
        with torch.inference_mode(False), torch.no_grad():
            emb = self.encoder.encode([text])
        return [[emb, {}]]


def load_toy_comfy(path: Path = BASE_WEIGHTS):
    """-> (ModelPatcher, ToyTextEncoderHandle). Weights are created outside inference mode, so they
    can be saved for backward when the toy trains inside a node."""
    if not Path(path).is_file():
        raise DopsdError(f"toy weights {path} are missing; reinstall the pack (a git checkout can also rebuild "
                         "them: python -m experiments.toy.lab toy-pretrain, then toy-distill)")
    sd, meta = load_tensors(path)
    cfg = ToyConfig(**json.loads(meta["dopsd.toy_config"]))
    with torch.inference_mode(False):
        model = ToyModelConfig(cfg).get_model(device=torch.device("cpu"))
        dit_sd = {k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")}
        model.diffusion_model.load_state_dict(dit_sd, strict=True)
        te = ToyTextEncoder(cfg.context_dim, cfg.text_depth)
        te.load_state_dict({k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")})
        te.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, ToyTextEncoderHandle(te)

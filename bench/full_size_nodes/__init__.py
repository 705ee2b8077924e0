"""A bench-only ComfyUI node pack for bench/full_size.py run: reports what the stock loaders loaded.

DOPSDFullSizeInfo takes the MODEL / CLIP / VAE the stock loaders returned and reports, as UI text in
the prompt's history, what ComfyUI's detection made of them: the model class and unet_config, the
parameter count of the diffusion model and of the text encoder, their stored and compute dtypes, the
VAE's latent layout. It reads only; it changes nothing. Loaded into the server only by the bench run
(a link in the run's custom_nodes/), never by the pack itself.
"""
from __future__ import annotations

import json
from collections import Counter


def _params(module) -> tuple[int, dict]:
    n, dtypes = 0, Counter()
    for p in module.parameters():
        n += p.numel()
        dtypes[str(p.dtype).replace("torch.", "")] += p.numel()
    return n, dict(dtypes)


class DOPSDFullSizeInfo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": ""})},
                "optional": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "dataset": ("DOPSD_DATASET",)}}

    RETURN_TYPES = ()
    FUNCTION = "info"
    OUTPUT_NODE = True
    CATEGORY = "D-OPSD/bench"

    def info(self, label, model=None, clip=None, vae=None, dataset=None):
        out = {"label": label}
        if dataset is not None:
            def shapes(v):
                if hasattr(v, "shape"):
                    return [list(v.shape), str(v.dtype).replace("torch.", "")]
                if isinstance(v, list):
                    return [shapes(x) for x in v]
                return v
            r = dataset.records[0]
            out["dataset"] = {"family": dataset.family, "records": len(dataset.records), "x0": shapes(r.x0),
                              "student": {k: shapes(v) for k, v in r.student_ctx[0].kwargs.items()},
                              "teacher": {k: shapes(v) for k, v in r.teacher_ctx[0].kwargs.items()},
                              "prior_prompts": len(dataset.prior.captions) if dataset.prior else 0}
        if model is not None:
            base = model.model
            n, dtypes = _params(base.diffusion_model)
            cfg = base.model_config
            out["model"] = {"class": type(base).__name__, "config": type(cfg).__name__,
                            "unet_config": {k: v for k, v in cfg.unet_config.items() if not callable(v)},
                            "parameters": n, "stored_dtypes": dtypes,
                            "manual_cast_dtype": str(cfg.manual_cast_dtype),
                            "quantized_layers": sum("Quantized" in type(p).__name__
                                                    for p in base.diffusion_model.parameters()),
                            "layer_quant_config": bool(getattr(cfg, "layer_quant_config", None))}
        if clip is not None:
            n, dtypes = _params(clip.cond_stage_model)
            own = sum(p.numel() for k, p in clip.cond_stage_model.named_parameters() if k.endswith("logit_scale"))
            out["clip"] = {"class": type(clip.cond_stage_model).__name__,
                           "tokenizer": type(clip.tokenizer).__name__, "parameters": n, "stored_dtypes": dtypes,
                           "comfyui_own_logit_scale": own}  # SDClipModel's scalar, not in the file
        if vae is not None:
            n, dtypes = _params(vae.first_stage_model)
            out["vae"] = {"class": type(vae.first_stage_model).__name__, "parameters": n, "stored_dtypes": dtypes,
                          "latent_channels": vae.latent_channels, "downscale_ratio": vae.downscale_ratio,
                          "buffers": sum(b.numel() for b in vae.first_stage_model.buffers())}
        return {"ui": {"text": [json.dumps(out, default=str)]}}


NODE_CLASS_MAPPINGS = {"DOPSDFullSizeInfo": DOPSDFullSizeInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"DOPSDFullSizeInfo": "D-OPSD full-size info (bench)"}

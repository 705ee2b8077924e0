"""Tiny seeded random-weight models in the real FLUX.2-klein and Z-Image-Turbo layouts, built with
ComfyUI's own classes. Shared by the test-only node pack (this package, loaded by the ComfyUI server)
and the in-process host tests (imported as comfyui.testing_nodes.tiny_models).

ComfyUI is imported inside the functions: importing this module needs nothing but torch. Every
builder draws its weights from its own torch.Generator (the global RNG is left alone), so the same
seed gives the same model in the test process and in the server.

Sizes, and why:
* klein DiT: ComfyUI detects FLUX.2 from the state dict at any size, but fixes axes_dim [32]*4 and
  num_heads = hidden / 128, so the tiny one has hidden 128 and one head; in_channels 128 = the
  32-channel VAE latent 2x2-patchified (inside the VAE, as the real flux2 VAE does).
* Z-Image DiT: recognised only at dim 3840, so it is built from comfy.supported_models.ZImage
  directly (dim 256: with z_image_modulation each block's adaLN takes min(dim, 256) features from a
  256-wide time embedder), cap_feat_dim = the tiny Z-Image text encoder's width.
* text encoders: the real klein / Z-Image CLIP classes with the Qwen3-4B config shrunk through
  model_options; klein reads hidden layers 9, 18 and 27 and stacks them (3 x 32 = the klein DiT's
  context_in_dim 96), so its tiny Qwen3 keeps 28 layers of width 32.
* VAEs: comfy.sd.VAE built from an explicit small AutoencoderKL config (ComfyUI's auto-detected
  Flux VAEs are fixed-size), then given the latent layout ComfyUI's detection gives the real files:
  flux2 (32 channels, BatchNorm + 2x2 patchify -> 128 channels at /16), flux (16 channels at /8).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

KLEIN_UNET = {
    "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 1, "mlp_ratio": 3.0, "theta": 2000,
    "out_channels": 128, "in_channels": 128, "global_modulation": True, "mlp_silu_act": True,
    "qkv_bias": False, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
    "txt_ids_dims": [3], "patch_size": 1, "hidden_size": 128, "context_in_dim": 96, "vec_in_dim": None,
    "depth": 1, "depth_single_blocks": 2, "guidance_embed": False,
}
ZIMAGE_UNET = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64,
    "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
    "axes_dims": [32, 48, 48], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
    "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
# FLUX.1 [schnell] layout: a family D-OPSD does not support (no in-context teacher path)
FLUX1_UNET = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 1, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 128,
    "context_in_dim": 32, "patch_size": 2, "vec_in_dim": 16, "depth": 1, "depth_single_blocks": 1,
    "guidance_embed": False,
}
# Qwen3-4B configs shrunk (Qwen3_4BConfig keeps vocab 151936, head_dim 128, rope_theta 1e6)
ZIMAGE_TE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
             "num_key_value_heads": 1}
KLEIN_TE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 28, "num_attention_heads": 2,
            "num_key_value_heads": 1}
# layout -> (z_channels, BatchNorm-patchified latent, latent channels, downscale) as ComfyUI's VAE
# detection sets them for the real flux2-vae.safetensors / ae.safetensors
VAE_LAYOUTS = {"flux2": (32, True, 128, 16), "flux": (16, False, 16, 8)}

KLEIN_FILE = "dopsd_tiny_flux2_klein.safetensors"
FLUX1_FILE = "dopsd_tiny_flux1_schnell.safetensors"


def fill_random_(named_tensors, seed: int, scale: float = 0.05, norms_near_one: bool = False) -> None:
    """Overwrite tensors in place with seeded N(0, scale^2) values (norm weights 1 + noise if asked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named_tensors:
            noise = torch.randn(t.shape, generator=g) * scale
            t.copy_(1.0 + noise if norms_near_one and name.endswith("norm.weight") else noise)


def _dit(config_cls, unet_config: dict, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    fill_random_(base.diffusion_model.named_parameters(), seed)  # random weights, non-zero everywhere
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


def tiny_klein(seed: int = 0):
    """ModelPatcher of a tiny FLUX.2-klein (model_base.Flux2), ~1.2 M parameters."""
    import comfy.supported_models
    return _dit(comfy.supported_models.Flux2, KLEIN_UNET, seed)


def tiny_zimage(seed: int = 0):
    """ModelPatcher of a tiny Z-Image-Turbo (model_base.Lumina2 with z_image_modulation), ~3.3 M."""
    import comfy.supported_models
    return _dit(comfy.supported_models.ZImage, ZIMAGE_UNET, seed)


def tiny_flux1(seed: int = 0):
    """ModelPatcher of a tiny FLUX.1 [schnell] (model_base.Flux): an unsupported family."""
    import comfy.supported_models
    return _dit(comfy.supported_models.FluxSchnell, FLUX1_UNET, seed)


def checkpoint_state_dict(model_patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's weights under the names of the released BFL checkpoints: ComfyUI's Flux
    modules call the QK-norm weights `..._norm.weight`, the files `..._norm.scale` (ComfyUI's
    Flux.process_unet_state_dict maps them back on load)."""
    sd = model_patcher.model.diffusion_model.state_dict()
    return {(k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v.detach().contiguous()
            for k, v in sd.items()}


def write_dit(model_patcher, path: Path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_state_dict(model_patcher), str(path))
    return path


def tiny_text_encoder(family: str, seed: int = 5):
    """comfy.sd.CLIP of the family's real text-encoder classes (klein: flux.klein_te + KleinTokenizer,
    Z-Image: z_image.te + ZImageTokenizer), shrunk through model_options, seeded random weights."""
    import comfy.sd
    if family == "flux2-klein":
        import comfy.text_encoders.flux as fl
        te, tokenizer, size = fl.klein_te(model_type="qwen3_4b"), fl.KleinTokenizer, KLEIN_TE
    elif family == "z-image":
        import comfy.text_encoders.z_image as zi
        te, tokenizer, size = zi.te(), zi.ZImageTokenizer, ZIMAGE_TE
    else:
        raise ValueError(family)

    class Target:
        params = {}
        clip = te
    Target.tokenizer = tokenizer
    clip = comfy.sd.CLIP(Target(), model_options={"qwen3_4b_model_config": size, "dtype": torch.float32})
    fill_random_(clip.cond_stage_model.named_parameters(), seed, norms_near_one=True)
    return clip


def tiny_vae(layout: str, seed: int = 1):
    """comfy.sd.VAE around a small AutoencoderKL (GroupNorm needs 32 channels; 3 downsamplings: /8)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    z, bn, latent_channels, down = VAE_LAYOUTS[layout]
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    if bn:
        ddconfig["batch_norm_latent"] = True
    params = {"ddconfig": ddconfig, "embed_dim": z}
    shapes = {k: v.shape for k, v in AutoencoderKL(**params).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = 1.0 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(shape, generator=g) * 0.1
        elif "norm" in k and k.endswith(".weight"):
            sd[k] = 1.0 + torch.randn(shape, generator=g) * 0.05
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    vae = comfy.sd.VAE(sd=sd, config={"params": params})
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = latent_channels, down, down
    return vae


def write_tiny_qwen3vl(folder: Path, hidden: int = ZIMAGE_TE["hidden_size"], seed: int = 0) -> Path:
    """A Qwen3-VL folder in the Hugging Face layout whose text config matches ZIMAGE_TE (same rope
    theta, so text-only input through the spliced model reproduces ComfyUI's Qwen3 encoder), with the
    tokenizer files of the ComfyUI checkout and a default chat template."""
    import shutil

    import comfy.text_encoders.z_image as zi
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from dopsd_core.hosts.zimage_vl import DEFAULT_CHAT_TEMPLATE
    folder = Path(folder)
    te = ZIMAGE_TE
    cfg = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
           "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, "tie_word_embeddings": True,
           "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": hidden,
                           "intermediate_size": te["intermediate_size"],
                           "num_hidden_layers": te["num_hidden_layers"],
                           "num_attention_heads": te["num_attention_heads"],
                           "num_key_value_heads": te["num_key_value_heads"], "head_dim": 128, "rms_norm_eps": 1e-6,
                           "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                           "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                            "mrope_interleaved": True}},
           "vision_config": {"model_type": "qwen3_vl", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
                             "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                             "out_hidden_size": hidden, "num_position_embeddings": 64,
                             "deepstack_visual_indexes": [0]}}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_dir = Path(zi.__file__).parent / "qwen25_tokenizer"
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, folder / f)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}))
    return folder

"""DOPSDDataset: images + captions -> latents, student contexts, teacher contexts."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io

from ..dopsd_core.data import ImageItem, load_image_folder
from ..dopsd_core.errors import DopsdError
from ..dopsd_core.hosts.comfy_train import build_dataset, dataset_cache_key, load_dataset, save_dataset
from .toy import ToyTextEncoder
from .vlm import VLM

Dataset = io.Custom("DOPSD_DATASET")


def _folder(path: str) -> Path:
    import folder_paths
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


def _weights_id(obj, *attrs: str) -> str:
    """Identity of a text encoder or VAE for the dataset cache key: a sampled hash of the weights of
    its first module found under `attrs`, else its type name (the toy's handles)."""
    from ..dopsd_core.hosts.comfy import sampled_weights_hash
    module = next((m for m in (getattr(obj, a, None) for a in attrs) if m is not None), None)
    return sampled_weights_hash(module) if module is not None else type(obj).__name__


def _encoder_id(encoder) -> str:
    return _weights_id(encoder, "encoder", "cond_stage_model")


def _vae_id(vae) -> str:
    return _weights_id(vae, "first_stage_model")


def _cache_path(model, family, items, encoder, extra: str = "") -> Path:
    import folder_paths

    from ..dopsd_core.hosts.comfy import ComfyDenoiser
    key = dataset_cache_key(family, ComfyDenoiser(model, family).fingerprint(), _encoder_id(encoder), items, extra)
    return Path(folder_paths.get_output_directory()) / "dopsd" / "cache" / f"{key}.safetensors"


def _items_from_images(images: torch.Tensor, template: str, resolution: int, buckets: bool) -> list[ImageItem]:
    """An IMAGE batch [N, H, W, C] -> items at the same target size as folder images (square crop, or
    the batch's aspect bucket); a batch already at that size is used as it is."""
    from ..dopsd_core.data import bucket_size, fit_image
    from ..dopsd_core.plot import to_pil
    captions = [line.strip() for line in template.splitlines() if line.strip()]
    if not captions:
        raise DopsdError("caption_template is blank; write at least one caption line with [V], e.g. 'a photo of [V]'")
    h, w = images.shape[1:3]
    size = bucket_size(w, h, resolution) if buckets else (resolution, resolution)

    def chw(img: torch.Tensor) -> torch.Tensor:  # [H, W, 3] -> [3, H', W'] at the target size
        return img.permute(2, 0, 1).float().contiguous().clone() if (w, h) == size else fit_image(to_pil(img), *size)
    return [ImageItem(f"image_{i:03d}", chw(images[i, ..., :3]), captions) for i in range(images.shape[0])]


def _vlm_id(vlm) -> str:
    from ..dopsd_core.hosts.zimage_vl import vlm_fingerprint
    return f"{vlm_fingerprint(vlm.folder)}|{vlm.text_encoder_file or 'clip'}|{vlm.dtype}"


def _vlm_dtype(name: str, device) -> torch.dtype | None:
    if name == "auto":
        return None  # bf16 on GPU, fp32 on CPU
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class DOPSDDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDataset", display_name="D-OPSD Dataset", category="D-OPSD",
            description="Encodes training images once: VAE latents, the student context (caption only) and the "
                        "teacher context (caption + the image in context) for every caption variant.",
            inputs=[
                io.Model.Input("model", tooltip="The turbo model to train (family decides the teacher context)."),
                io.String.Input("folder", default="", tooltip="Image folder (absolute, or relative to ComfyUI's "
                                "input folder) with same-name .txt captions, one variant per line. Leave empty "
                                "to use the images input."),
                io.String.Input("caption_template", multiline=True, default="a photo of [V]",
                                tooltip="Caption variants (one per line) for the images input; [V] is the concept."),
                io.Int.Input("resolution", default=1024, min=32, max=4096, step=16,
                             tooltip="Training resolution: images are resized to about resolution² pixels "
                                     "(the toy model always uses 32x32)."),
                io.Boolean.Input("aspect_buckets", default=True, optional=True,
                                 tooltip="Keep each image's aspect ratio (up to 2:1) in a bucket of about "
                                         "resolution² pixels, sides multiples of 64; a training batch takes "
                                         "images of one bucket. Off: centre-crop every image to a square."),
                io.Image.Input("images", optional=True, tooltip="Training images instead of a folder."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder of the model (FLUX.2-klein, Z-Image)."),
                io.Vae.Input("vae", optional=True, tooltip="VAE of the model (FLUX.2-klein, Z-Image)."),
                ToyTextEncoder.Input("toy_text_encoder", optional=True,
                                     tooltip="For the built-in toy model: its text encoder."),
                VLM.Input("vlm", optional=True,
                          tooltip="For Z-Image-Turbo: D-OPSD Qwen3-VL Loader (the teacher sees the target image "
                                  "through Qwen3-VL spliced with this clip's Qwen3-4B weights)."),
            ],
            outputs=[Dataset.Output(display_name="DATASET")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder="", **kwargs):
        """Re-run when the folder's images or captions change (ComfyUI caches by input values otherwise)."""
        from ..dopsd_core.data import folder_fingerprint
        if not folder or not folder.strip():
            return ""
        try:
            return folder_fingerprint(_folder(folder.strip()))
        except DopsdError as e:  # execute() reports it
            return str(e)

    @classmethod
    def execute(cls, model, folder, caption_template, resolution, aspect_buckets=True, images=None, clip=None,
                vae=None, toy_text_encoder=None, vlm=None):
        from ..dopsd_core.hosts.comfy import detect_family
        family = detect_family(model.model)
        if family == "toy":  # a fixed 32x32 world
            resolution, aspect_buckets = 32, False
        if folder.strip():
            items = load_image_folder(_folder(folder.strip()), resolution, aspect_buckets)
        elif images is not None:
            items = _items_from_images(images, caption_template, resolution, aspect_buckets)
        else:
            raise DopsdError("no training images: set folder or connect images")
        # refuse before any encoding work, and before the cache lookup (a cached dataset must not hide a
        # missing input)
        if family == "z-image":
            if clip is None or vae is None:
                raise DopsdError("the Z-Image dataset needs the model's clip (qwen_3_4b) and vae: connect both")
            if vlm is None:
                raise DopsdError("Z-Image-Turbo's teacher is the Qwen3-VL splice: add a 'D-OPSD Qwen3-VL Loader' "
                                 "node with a Qwen3-VL-4B-Instruct folder from models/dopsd_vlm and connect it "
                                 "to vlm")
        elif family == "flux2-klein" and (clip is None or vae is None):
            raise DopsdError("the FLUX.2-klein dataset needs the model's clip (Qwen3) and vae: connect both")
        extra = "" if family == "toy" else f"vae={_vae_id(vae)}"  # the latents depend on the VAE too
        if family == "z-image":
            extra += f"|{_vlm_id(vlm)}"
        cache = _cache_path(model, family, items, clip if family != "toy" else toy_text_encoder, extra)
        if cache.is_file():
            return io.NodeOutput(load_dataset(cache))
        if family == "toy":
            if toy_text_encoder is None:
                raise DopsdError("the toy model's dataset needs its text encoder: connect TEXT_ENCODER from "
                                 "D-OPSD Toy Model Loader to toy_text_encoder")

            def encode_text(caption):
                cond = toy_text_encoder.encode(caption)
                return cond[0][0], dict(cond[0][1])
            ds = build_dataset(model, items, encode_text)
        elif family == "flux2-klein":
            from ..dopsd_core.hosts.comfy import PRESETS
            from ..dopsd_core.hosts.comfy_train import klein_teacher

            def encode_text(caption):
                cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
                return cond[0][0], dict(cond[0][1])
            ds = build_dataset(model, items, encode_text, klein_teacher(encode_text, PRESETS[family].teacher_suffix),
                               vae=vae)
        else:  # z-image: the Qwen3-VL splice (dopsd_core.hosts.zimage_vl)
            import comfy.model_management as mm

            from ..dopsd_core.hosts.zimage_vl import build_zimage_dataset

            def encode_text(caption):
                cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
                return cond[0][0], dict(cond[0][1])

            def free_memory():  # the CLIP's weights stay readable on the offload device for the splice
                mm.unload_all_models()
                mm.soft_empty_cache()
            device = mm.get_torch_device()
            ds, _report = build_zimage_dataset(model, items, encode_text, vae, vlm.folder,
                                               vlm.text_encoder_file or clip, device=device,
                                               dtype=_vlm_dtype(vlm.dtype, device), free_memory=free_memory)
        save_dataset(ds, cache)
        if family != "toy":  # the contexts are cached: free the text encoder and VAE for training
            import comfy.model_management as mm
            mm.unload_all_models()
            mm.soft_empty_cache()
        return io.NodeOutput(ds)


NODES = [DOPSDDataset]

"""One class per model family: everything that differs between the toy, FLUX.2-klein and Z-Image-Turbo.

The nodes, ComfyDenoiser and the dataset build ask the family object; none of them compares a family
name. Adding a family is one subclass here, listed in FAMILIES, plus its tests. ComfyUI is imported
lazily, inside the methods, so this module imports outside ComfyUI too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..data import ImageItem
from ..errors import DopsdError

EncodeText = Callable[[str], tuple]  # caption -> (cond [1, T, D], extra conds dict)
TeacherContext = Callable[[str, torch.Tensor, ImageItem], tuple]  # caption, VAE latent, item -> (cond, extra)


@dataclass
class EncoderInputs:
    """The dataset node's optional encoder inputs; each family says which ones it needs."""
    clip: Any = None
    vae: Any = None
    toy_text_encoder: Any = None
    vlm: Any = None  # DOPSDQwen3VLLoader's choice: .folder, .text_encoder_file, .dtype


class Family:
    name: ClassVar[str]  # stored in datasets, run folders and LoRA metadata
    title: ClassVar[str]  # in messages
    lora_targets: ClassVar[str]  # regex over diffusion-model module names (docs/method.md)
    blocks: ClassVar[str]  # regex of the transformer blocks checkpointed one by one
    lr: ClassVar[float]
    rank: ClassVar[int]
    alpha: ClassVar[float]
    sample_steps: ClassVar[int] = 4  # the family's few-step sampling default
    # Blocks that add into their own inputs in place (FLUX.2: img += ..., x += ...). Autograd and
    # checkpoint recomputation then see the updated tensors; ComfyDenoiser works on copies instead.
    in_place_blocks: ClassVar[bool] = False
    fixed_resolution: ClassVar[int | None] = None  # a model that knows one image size only

    @classmethod
    def matches(cls, base_model) -> bool:
        raise NotImplementedError

    # --- dataset -------------------------------------------------------------------------------------
    def check_inputs(self, inputs: EncoderInputs) -> None:
        """Refuse a missing encoder before any work (and before the cache lookup: a cached dataset
        must not hide a missing input)."""

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        """(text encoder id, extra) for the dataset cache key: whatever else shaped the contexts."""
        raise NotImplementedError

    def encode_images(self, items: list[ImageItem], vae) -> list[torch.Tensor]:
        """Images [3, H, W] in [0, 1] -> VAE latents [C, h, w]."""
        return [vae.encode(item.image.permute(1, 2, 0)[None])[0].float() for item in items]

    def build_dataset(self, model_patcher, items: list[ImageItem], inputs: EncoderInputs,
                      prior_captions: list[str] | None = None):
        """-> ComfyDataset with the student (caption) and teacher (caption + target) contexts, and the
        prior prompts' student contexts."""
        from .comfy_train import build_dataset
        encode_text = self.student_encoder(inputs)
        return build_dataset(model_patcher, items, encode_text, self.teacher_context(encode_text), vae=inputs.vae,
                             prior_captions=prior_captions)

    def generic_prompts(self) -> list[str]:
        """Built-in prompts of things the family's users keep drawing, for prior_prompts 'auto'."""
        return list(GENERIC_PHOTO_PROMPTS)

    def student_encoder(self, inputs: EncoderInputs) -> EncodeText:
        return clip_encoder(inputs.clip)

    def teacher_context(self, encode_text: EncodeText) -> TeacherContext:
        """The in-context teacher: by default the caption plus the target as a reference latent."""
        def teacher(caption: str, latent: torch.Tensor, item: ImageItem):
            cond, extra = encode_text(caption)
            return cond, {**extra, "reference_latents": [latent[None]]}
        return teacher

    def release_encoders(self) -> None:
        """After the dataset is cached: free the text encoder and VAE for training."""
        import comfy.model_management as mm
        mm.unload_all_models()
        mm.soft_empty_cache()

    # --- sampling ------------------------------------------------------------------------------------
    def sigma_grid(self, base_model, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The few-step grid (sigma_0 = 1 ... 0) for latents of this shape [C, h, w]."""
        import comfy.samplers
        return [float(s) for s in comfy.samplers.calculate_sigmas(base_model.model_sampling, "simple", steps)]

    def latent_shape(self, latent_format, width: int, height: int) -> tuple[int, int, int]:
        down = latent_format.spacial_downscale_ratio
        return (latent_format.latent_channels, height // down, width // down)


class ToyFamily(Family):
    name, title = "toy", "the built-in D-OPSD toy model"
    lora_targets = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    blocks = r"blocks\.\d+"
    lr, rank, alpha = 3e-3, 16, 16.0  # toy/runs.py TOY_BUDGET (the trade-off study's budget stage)
    fixed_resolution = 32

    @classmethod
    def matches(cls, base_model) -> bool:
        from .comfy_toy import ToyBaseModel
        return isinstance(base_model, ToyBaseModel)

    def check_inputs(self, inputs: EncoderInputs) -> None:
        if inputs.toy_text_encoder is None:
            raise DopsdError("the toy model's dataset needs its text encoder: connect TEXT_ENCODER from "
                             "D-OPSD Toy Model Loader to toy_text_encoder")

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        return weights_id(inputs.toy_text_encoder, "encoder", "cond_stage_model"), ""

    def encode_images(self, items: list[ImageItem], vae) -> list[torch.Tensor]:
        return [item.image * 2.0 - 1.0 for item in items]  # the toy's "VAE" is the identity on [-1, 1]

    def student_encoder(self, inputs: EncoderInputs) -> EncodeText:
        def encode(caption: str):
            cond = inputs.toy_text_encoder.encode(caption)
            return cond[0][0], dict(cond[0][1])
        return encode

    def release_encoders(self) -> None:
        pass  # tiny, on the CPU

    def generic_prompts(self) -> list[str]:
        from ..toy.metrics import prior_prompts
        return prior_prompts()

    def latent_shape(self, latent_format, width: int, height: int) -> tuple[int, int, int]:
        return (latent_format.latent_channels, self.fixed_resolution, self.fixed_resolution)


class Flux2KleinFamily(Family):
    name, title = "flux2-klein", "FLUX.2-klein (4B/9B)"
    lora_targets = (r"double_blocks\.\d+\.((img_attn|txt_attn)\.(qkv|proj)|(img_mlp|txt_mlp)\.(0|2))"
                    r"|single_blocks\.\d+\.(linear1|linear2)")
    blocks = r"(double_blocks|single_blocks)\.\d+"
    lr, rank, alpha = 2e-5, 64, 128.0
    in_place_blocks = True
    # the released teacher prompt: appended to the caption when the target is the reference image
    teacher_suffix = (" Make the main subject (facial/ip details), background, and overall composition "
                      "consistent with the reference image.")

    @classmethod
    def matches(cls, base_model) -> bool:
        import comfy.model_base as mb
        return isinstance(base_model, getattr(mb, "Flux2", ()))

    def check_inputs(self, inputs: EncoderInputs) -> None:
        if inputs.clip is None or inputs.vae is None:
            raise DopsdError("the FLUX.2-klein dataset needs the model's clip (Qwen3) and vae: connect both")

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        return clip_id(inputs.clip), f"vae={vae_id(inputs.vae)}"  # the latents depend on the VAE too

    def teacher_context(self, encode_text: EncodeText) -> TeacherContext:
        """klein's own multi-reference path (method `index`): caption + suffix, target as reference."""
        plain = super().teacher_context(encode_text)

        def teacher(caption: str, latent: torch.Tensor, item: ImageItem):
            return plain(caption.rstrip() + self.teacher_suffix, latent, item)
        return teacher

    def sigma_grid(self, base_model, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The resolution-aware schedule of ComfyUI's Flux2Scheduler node for this latent size
        (latents are /16: one image token per latent pixel)."""
        from comfy_extras.nodes_flux import get_schedule
        h, w = latent_shape[-2:]
        return [float(s) for s in get_schedule(steps, round(h * w))]


class ZImageFamily(Family):
    name, title = "z-image", "Z-Image-Turbo"
    lora_targets = r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.(w1|w2|w3))"
    blocks = r"(layers|noise_refiner|context_refiner)\.\d+"
    lr, rank, alpha = 1e-4, 64, 128.0

    @classmethod
    def matches(cls, base_model) -> bool:
        import comfy.model_base as mb
        return (isinstance(base_model, getattr(mb, "Lumina2", ()))
                and bool(base_model.model_config.unet_config.get("z_image_modulation")))

    def check_inputs(self, inputs: EncoderInputs) -> None:
        if inputs.clip is None or inputs.vae is None:
            raise DopsdError("the Z-Image dataset needs the model's clip (qwen_3_4b) and vae: connect both")
        if inputs.vlm is None:
            raise DopsdError("Z-Image-Turbo's teacher is the Qwen3-VL splice: add a 'D-OPSD Qwen3-VL Loader' "
                             "node with a Qwen3-VL-4B-Instruct folder from models/dopsd_vlm and connect it to vlm")

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        from .zimage_vl import vlm_fingerprint
        vlm = inputs.vlm
        vlm_part = f"{vlm_fingerprint(vlm.folder)}|{vlm.text_encoder_file or 'clip'}|{vlm.dtype}"
        return clip_id(inputs.clip), f"vae={vae_id(inputs.vae)}|{vlm_part}"

    def build_dataset(self, model_patcher, items: list[ImageItem], inputs: EncoderInputs,
                      prior_captions: list[str] | None = None):
        """The teacher sees the target through Qwen3-VL spliced with this clip's Qwen3-4B weights
        (dopsd_core.hosts.zimage_vl); the CLIP is unloaded first, its weights stay readable."""
        import comfy.model_management as mm

        from .zimage_vl import build_zimage_dataset
        vlm, device = inputs.vlm, mm.get_torch_device()
        ds, _report = build_zimage_dataset(model_patcher, items, self.student_encoder(inputs), inputs.vae,
                                           vlm.folder, vlm.text_encoder_file or inputs.clip, device=device,
                                           dtype=VLM_DTYPES[vlm.dtype], free_memory=self.release_encoders,
                                           prior_captions=prior_captions)
        return ds


# Generic prompts for the photo families' automatic prior: everyday subjects a concept LoRA must not change.
GENERIC_PHOTO_PROMPTS = (
    "a photo of a man", "a photo of a woman", "a photo of a child", "a photo of a dog", "a photo of a cat",
    "a city street at night", "a mountain landscape at sunrise", "a bowl of fruit on a wooden table",
    "a red sports car", "a living room with a sofa", "a close-up portrait, studio lighting",
    "an oil painting of a harbour", "a watercolor of flowers", "a bird on a branch", "a plate of food",
)

FAMILIES: tuple[type[Family], ...] = (ToyFamily, Flux2KleinFamily, ZImageFamily)
SUPPORTED = ", ".join(f.title for f in FAMILIES)
VLM_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # auto: bf16 on GPU


def detect_family(base_model) -> Family:
    """The family of a ComfyUI BaseModel, or a clear error naming the supported ones."""
    for fam in FAMILIES:
        if fam.matches(base_model):
            return fam()
    raise DopsdError(f"this MODEL ({type(base_model).__name__}) has no in-context teacher path D-OPSD can use; "
                     f"supported: {SUPPORTED}")


def family_named(name: str) -> Family:
    """The family a dataset or run folder recorded by name."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam()
    raise DopsdError(f"unknown model family {name!r}; supported: {SUPPORTED}")


def check_same_family(model_patcher, dataset) -> Family:
    """The MODEL's family, refusing a dataset built for another one."""
    family = detect_family(model_patcher.model)
    if family.name != dataset.family:
        raise DopsdError(f"the dataset was built for {dataset.family} but the MODEL is {family.name}; "
                         "build the dataset with the same model")
    return family


def clip_encoder(clip) -> EncodeText:
    """A ComfyUI CLIP as the student's caption encoder (its own tokenizer and scheduled encode)."""
    def encode(caption: str):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
        return cond[0][0], dict(cond[0][1])
    return encode


def weights_id(obj, *attrs: str) -> str:
    """Identity of an encoder or VAE for the dataset cache key: a sampled hash of the weights of its
    first module found under `attrs`, else its type name."""
    from .comfy import sampled_weights_hash
    module = next((m for m in (getattr(obj, a, None) for a in attrs) if m is not None), None)
    return sampled_weights_hash(module) if module is not None else type(obj).__name__


def clip_id(clip) -> str:
    return weights_id(clip, "encoder", "cond_stage_model")


def vae_id(vae) -> str:
    return weights_id(vae, "first_stage_model")

"""How each model family talks to ComfyUI: which BaseModel it is, which encoders its dataset needs, how
its teacher context is made, its sigma grid. Its numbers and patterns (targets, blocks, lr, rank, steps,
presets, generic prompts) are data in dopsd_core/family_spec.py; each class here names its spec.

The nodes, ComfyDenoiser and the dataset build ask the family object; none of them compares a family
name. Adding a family is a spec, one subclass here listed in FAMILIES, and its tests. This module is the
bottom of hosts/ (it imports only the spec, identity and the core's data types); ComfyUI is imported
lazily, inside the methods, so it imports outside ComfyUI too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..data import ImageItem
from ..errors import DopsdError
from ..family_spec import FLUX2_KLEIN, TOY, Z_IMAGE, FamilySpec
from .identity import clip_id, vae_id, vlm_fingerprint, weights_id

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
    spec: ClassVar[FamilySpec]
    # Blocks that add into their own inputs in place (FLUX.2: img += ..., x += ...). Autograd and
    # checkpoint recomputation then see the updated tensors; ComfyDenoiser works on copies instead.
    in_place_blocks: ClassVar[bool] = False
    teacher_encoder: ClassVar[str] = "reference"  # "reference": the target as reference latents; "qwen3-vl"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sp = cls.spec  # the spec's facts under the names the host code reads
        cls.name, cls.title, cls.lora_targets, cls.blocks = sp.name, sp.title, sp.lora_targets, sp.blocks
        cls.lr, cls.rank, cls.alpha, cls.sample_steps = sp.lr, sp.rank, sp.alpha, sp.sample_steps
        cls.fixed_resolution = sp.fixed_resolution

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

    def generic_prompts(self) -> list[str]:
        """Built-in prompts of things the family's users keep drawing, for prior_prompts 'auto'."""
        return self.spec.prompts_for_prior()

    def student_encoder(self, inputs: EncoderInputs) -> EncodeText:
        return clip_encoder(inputs.clip)

    def teacher_context(self, encode_text: EncodeText) -> TeacherContext:
        """The in-context teacher: by default the caption plus the target as a reference latent."""
        def teacher(caption: str, latent: torch.Tensor, item: ImageItem):
            cond, extra = encode_text(caption)
            return cond, {**extra, "reference_latents": [latent[None]]}
        return teacher

    def context_width(self, base_model) -> int | None:
        """How wide a text context the diffusion model reads (None: any)."""
        return None

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
    spec = TOY

    @classmethod
    def matches(cls, base_model) -> bool:
        # hosts/comfy_toy.py's model config class names it, as ComfyUI's own configs name their models
        config_class = type(getattr(base_model, "model_config", None))
        return (getattr(config_class, "unet_config", None) or {}).get("image_model") == "dopsd_toy"

    def check_inputs(self, inputs: EncoderInputs) -> None:
        if inputs.toy_text_encoder is None:
            raise DopsdError("the toy model's dataset needs its text encoder: connect TEXT_ENCODER from "
                             "D-OPSD Toy Model Loader to toy_text_encoder")

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        return weights_id(inputs.toy_text_encoder, "encoder", "cond_stage_model"), ""

    def encode_images(self, items: list[ImageItem], vae) -> list[torch.Tensor]:
        from ..toy.denoiser import image_to_latent  # the toy's "VAE": the identity on [-1, 1]
        return [image_to_latent(item.image) for item in items]

    def student_encoder(self, inputs: EncoderInputs) -> EncodeText:
        def encode(caption: str):
            cond = inputs.toy_text_encoder.encode(caption)
            return cond[0][0], dict(cond[0][1])
        return encode

    def release_encoders(self) -> None:
        pass  # tiny, on the CPU

    def latent_shape(self, latent_format, width: int, height: int) -> tuple[int, int, int]:
        return (latent_format.latent_channels, self.fixed_resolution, self.fixed_resolution)


class Flux2KleinFamily(Family):
    spec = FLUX2_KLEIN
    in_place_blocks = True
    teacher_suffix = FLUX2_KLEIN.teacher_suffix
    clip_type = "flux2"  # CLIPLoader's type for its Qwen3 text encoders

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

    def context_width(self, base_model) -> int:
        return base_model.diffusion_model.txt_in.in_features  # 3 stacked Qwen3 layers: 7680 (4B), 12288 (8B)

    def sigma_grid(self, base_model, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The resolution-aware schedule of ComfyUI's Flux2Scheduler node for this latent size
        (latents are /16: one image token per latent pixel)."""
        from comfy_extras.nodes_flux import get_schedule
        h, w = latent_shape[-2:]
        return [float(s) for s in get_schedule(steps, round(h * w))]


class ZImageFamily(Family):
    spec = Z_IMAGE
    teacher_encoder = "qwen3-vl"  # the target through Qwen3-VL spliced with the clip's Qwen3-4B (zimage_vl.py)
    clip_type = "lumina2"  # CLIPLoader's type for qwen_3_4b with Z-Image

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

    def context_width(self, base_model) -> int:
        return base_model.diffusion_model.cap_embedder[0].weight.shape[0]  # cap_feat_dim: Qwen3-4B's 2560

    def cache_identity(self, inputs: EncoderInputs) -> tuple[str, str]:
        vlm = inputs.vlm
        vlm_part = f"{vlm_fingerprint(vlm.folder)}|{vlm.text_encoder_file or 'clip'}|{vlm.dtype}"
        return clip_id(inputs.clip), f"vae={vae_id(inputs.vae)}|{vlm_part}"


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

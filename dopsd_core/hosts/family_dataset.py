"""A family's training dataset from ComfyUI's loaded objects: the one place that picks the teacher path
(the target as reference latents: comfy_train.build_dataset; Z-Image's Qwen3-VL splice: zimage_vl)."""
from __future__ import annotations

from ..data import ImageItem
from .comfy_train import ComfyDataset, build_dataset
from .families import VLM_DTYPES, EncoderInputs, Family


def build_family_dataset(family: Family, model_patcher, items: list[ImageItem], inputs: EncoderInputs,
                         prior_captions: list[str] | None = None,
                         sample_captions: list[str] | None = None) -> ComfyDataset:
    """-> ComfyDataset with the student (caption) and teacher (caption + target) contexts, and the prior
    prompts' and the previews' sample prompts' student contexts."""
    encode_text = family.student_encoder(inputs)
    if family.teacher_encoder == "qwen3-vl":
        # the teacher sees the target through Qwen3-VL spliced with this clip's Qwen3-4B weights; the CLIP
        # is unloaded first, its weights stay readable
        import comfy.model_management as mm

        from .zimage_vl import build_zimage_dataset
        vlm = inputs.vlm
        ds, _report = build_zimage_dataset(model_patcher, items, encode_text, inputs.vae, vlm.folder,
                                           vlm.text_encoder_file or inputs.clip, device=mm.get_torch_device(),
                                           dtype=VLM_DTYPES[vlm.dtype], free_memory=family.release_encoders,
                                           prior_captions=prior_captions, sample_captions=sample_captions)
        return ds
    return build_dataset(model_patcher, items, encode_text, family.teacher_context(encode_text), vae=inputs.vae,
                         prior_captions=prior_captions, sample_captions=sample_captions)

"""DOPSDDataset: images + captions -> latents, student contexts, teacher contexts."""
from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io

from ..dopsd_core.data import ImageItem, load_image_folder
from ..dopsd_core.errors import DopsdError
from ..dopsd_core.hosts.comfy_train import dataset_cache_file, read_cached_dataset, save_dataset
from ..dopsd_core.hosts.family_dataset import build_family_dataset
from ..dopsd_core.prior import trigger_or_none
from .toy import ToyTextEncoderSocket
from .paths import DATASET_ROOTS, folder_inside
from .vlm import VLM

Dataset = io.Custom("DOPSD_DATASET")


def _dataset_roots() -> list[str]:
    """ComfyUI's input folder, then any roots the server's extra_model_paths.yaml lists as dopsd_datasets."""
    import folder_paths
    extra = folder_paths.folder_names_and_paths.get(DATASET_ROOTS, ([], set()))[0]
    return [folder_paths.get_input_directory(), *extra]


def _folder(name: str) -> Path:
    """The image folder a node input names, only under ComfyUI's input folder (and the dataset roots)."""
    return folder_inside(name, _dataset_roots())


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


def _prior_prompts(text: str, captions: list[str], trigger: str | None, class_word: str | None, family):
    from ..dopsd_core.prior import auto_prior_prompts, parse_prompt_lines
    if text.strip().lower() == "auto":
        return auto_prior_prompts(captions, trigger, class_word, family.generic_prompts())
    return parse_prompt_lines(text) or None


class DOPSDDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDDataset", display_name="D-OPSD Dataset", category="D-OPSD",
            description="Encodes training images once: VAE latents, the student context (caption only) and the "
                        "teacher context (caption + the image in context) for every caption variant.",
            inputs=[
                io.Model.Input("model", tooltip="The turbo model to train (family decides the teacher context)."),
                io.String.Input("folder", default="", tooltip="Image folder inside ComfyUI's input folder (its "
                                "name there, e.g. my_concept) with same-name .txt captions, one variant per line. "
                                "Leave empty to use the images input."),
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
                ToyTextEncoderSocket.Input("toy_text_encoder", optional=True,
                                     tooltip="For the built-in toy model: its text encoder."),
                VLM.Input("vlm", optional=True,
                          tooltip="For Z-Image-Turbo: D-OPSD Qwen3-VL Loader (the teacher sees the target image "
                                  "through Qwen3-VL spliced with this clip's Qwen3-4B weights)."),
                # appended last and optional: workflows saved before them keep loading
                io.String.Input("prior_prompts", multiline=True, default="auto", optional=True,
                                tooltip="Prior preservation: prompts whose behaviour training keeps (the trainer's "
                                        "prior_weight sets how strongly). 'auto' (default): the captions with the "
                                        "trigger replaced by class_word (or removed; left out when they have no "
                                        "trigger), the empty prompt and generic prompts of the model family. Or one "
                                        "per line (<empty> = the empty prompt). Empty: no prior."),
                io.String.Input("trigger", default="", optional=True,
                                tooltip="The word in the captions that names the concept; empty = their bracket "
                                        "token, e.g. [V]."),
                io.String.Input("class_word", default="", optional=True,
                                tooltip="For prior_prompts 'auto': what replaces the trigger (e.g. 'dog'); empty "
                                        "removes it."),
                io.String.Input("sample_prompts", multiline=True, default="", optional=True,
                                tooltip="The trainers' preview prompts, one per line, drawn at every preview on "
                                        "fixed noise beside the starting model's samples. Empty: two with the "
                                        "trigger in new settings and two unrelated prompts that must not change."),
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
                vae=None, toy_text_encoder=None, vlm=None, prior_prompts="auto", trigger="", class_word="",
                sample_prompts=""):
        import folder_paths

        from ..dopsd_core.hosts.families import EncoderInputs, detect_family
        family = detect_family(model.model)
        if family.fixed_resolution:  # the toy: one image size, no buckets
            resolution, aspect_buckets = family.fixed_resolution, False
        if folder.strip():
            items = load_image_folder(_folder(folder.strip()), resolution, aspect_buckets)
        elif images is not None:
            items = _items_from_images(images, caption_template, resolution, aspect_buckets)
        else:
            raise DopsdError("no training images: set folder or connect images")
        inputs = EncoderInputs(clip=clip, vae=vae, toy_text_encoder=toy_text_encoder, vlm=vlm)
        family.check_inputs(inputs)
        captions = [c for item in items for c in item.captions]
        trigger = trigger.strip() or trigger_or_none(captions)
        prior = _prior_prompts(prior_prompts, captions, trigger, class_word.strip() or None, family)
        from ..dopsd_core.prior import parse_prompt_lines
        samples = parse_prompt_lines(sample_prompts or "") or family.spec.sample_prompts(captions, trigger)
        cache = dataset_cache_file(Path(folder_paths.get_output_directory()) / "dopsd" / "cache", model, family,
                                   items, inputs, prior, samples)
        ds = read_cached_dataset(cache)
        if ds is not None:
            ds.trigger = trigger  # metadata only: the tensors do not depend on it
            return io.NodeOutput(ds)
        # a Cancel during the encoding leaves no cache entry: the dataset is built in memory, then saved
        # in one atomic write
        ds = build_family_dataset(family, model, items, inputs, prior, samples)
        ds.trigger = trigger
        save_dataset(ds, cache)
        family.release_encoders()  # the contexts are cached: free the encoders for training
        return io.NodeOutput(ds)


NODES = [DOPSDDataset]

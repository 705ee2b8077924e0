"""Nodes for the built-in toy model: a real ComfyUI MODEL, its text encoder, and latent <-> image."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..dopsd_core.hosts.comfy_toy import load_toy_comfy
from ..dopsd_core.toy.denoiser import BASE_WEIGHTS

ToyTextEncoderSocket = io.Custom("DOPSD_TOY_TEXT_ENCODER")  # carries hosts.comfy_toy.ToyTextEncoderHandle


class DOPSDToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyModelLoader", display_name="D-OPSD Toy Model Loader", category="D-OPSD/toy",
            description="Loads the built-in 4-step toy turbo model (32x32 RGB shapes), whose weights ship with "
                        "the pack. Runs on CPU.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"),
                     ToyTextEncoderSocket.Output(display_name="TEXT_ENCODER")],
        )

    @classmethod
    def execute(cls):
        return io.NodeOutput(*load_toy_comfy(BASE_WEIGHTS))


class DOPSDToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyTextEncode", display_name="D-OPSD Toy Text Encode", category="D-OPSD/toy",
            inputs=[ToyTextEncoderSocket.Input("text_encoder", tooltip="From D-OPSD Toy Model Loader."),
                    io.String.Input("text", multiline=True, default="a red [V1] on a black background",
                                    tooltip="Toy vocabulary: shapes, colours, backgrounds, [V], [V1]..[V8].")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, text):
        return io.NodeOutput(text_encoder.encode(text))


class DOPSDToyEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyEmptyLatent", display_name="D-OPSD Toy Empty Latent", category="D-OPSD/toy",
            inputs=[io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Number of images.")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, batch_size):
        return io.NodeOutput({"samples": torch.zeros(batch_size, 3, 32, 32)})


class DOPSDToyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyDecode", display_name="D-OPSD Toy Decode", category="D-OPSD/toy",
            description="The toy's 'VAE' is the identity: latent in [-1, 1] -> image in [0, 1].",
            inputs=[io.Latent.Input("samples", tooltip="Toy latents [B, 3, 32, 32]."),
                    io.Int.Input("scale", default=4, min=1, max=16, tooltip="Nearest-neighbour upscale for viewing.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, scale):
        lat = samples["samples"]
        if lat.ndim != 4 or lat.shape[1] != 3:
            raise ValueError(f"expected toy latents [B, 3, H, W], got {tuple(lat.shape)}; use the toy model's latents")
        img = ((lat.float() + 1) / 2).clamp(0, 1)
        img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest") if scale > 1 else img
        return io.NodeOutput(img.permute(0, 2, 3, 1).contiguous())


class DOPSDToyConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..dopsd_core.toy.render import CONCEPT_TOKEN, HELD_OUT_SHAPES
        return io.Schema(
            node_id="DOPSDToyConcept", display_name="D-OPSD Toy Concept Images", category="D-OPSD/toy",
            description="The training images of a shape the toy base model never saw (star = [V1], heart = [V2], "
                        "crescent = [V3]): the same renders `dopsd toy-data` exports, so no files are needed.",
            inputs=[io.Combo.Input("shape", options=list(HELD_OUT_SHAPES), default=HELD_OUT_SHAPES[0],
                                   tooltip="Held-out shape: " + ", ".join(f"{s} {t}" for s, t in CONCEPT_TOKEN.items())),
                    io.Int.Input("count", default=6, min=1, max=8, tooltip="Number of example images (4-8).")],
            outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="token")],
        )

    @classmethod
    def execute(cls, shape, count):
        from ..dopsd_core.toy.render import CONCEPT_TOKEN, concept_scenes, render
        images = torch.stack([render(s) for s in concept_scenes(shape, count)])  # [N, 3, 32, 32] in [0, 1]
        return io.NodeOutput(images.permute(0, 2, 3, 1).contiguous(), CONCEPT_TOKEN[shape])


NODES = [DOPSDToyModelLoader, DOPSDToyTextEncode, DOPSDToyEmptyLatent, DOPSDToyDecode, DOPSDToyConcept]

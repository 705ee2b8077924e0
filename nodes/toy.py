"""Nodes for the built-in toy model: a real ComfyUI MODEL, its text encoder, and latent <-> image."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..dopsd_core.hosts.comfy_toy import load_toy_comfy
from ..dopsd_core.toy.denoiser import BASE_WEIGHTS

ToyTextEncoder = io.Custom("DOPSD_TOY_TEXT_ENCODER")


class DOPSDToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyModelLoader", display_name="D-OPSD Toy Model Loader", category="D-OPSD/toy",
            description="Loads the built-in 4-step toy turbo model (32x32 RGB shapes). Runs on CPU.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"),
                     ToyTextEncoder.Output(display_name="TEXT_ENCODER")],
        )

    @classmethod
    def execute(cls):
        model, te = load_toy_comfy(BASE_WEIGHTS)
        return io.NodeOutput(model, te)


class DOPSDToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDToyTextEncode", display_name="D-OPSD Toy Text Encode", category="D-OPSD/toy",
            inputs=[ToyTextEncoder.Input("text_encoder", tooltip="From D-OPSD Toy Model Loader."),
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


NODES = [DOPSDToyModelLoader, DOPSDToyTextEncode, DOPSDToyEmptyLatent, DOPSDToyDecode]

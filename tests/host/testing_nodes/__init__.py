"""Test-only ComfyUI node pack (never shipped; ComfyUI's own tests/execution/testing_nodes pattern).

tests/host/conftest.py links this folder into the test server's custom_nodes. Its nodes build the
tiny FLUX.2-klein / Z-Image components that ComfyUI's stock loaders recognise only at full size (the
Z-Image DiT, the Qwen3 text encoders, the Flux VAEs) with ComfyUI's own classes and hand real
MODEL / CLIP / VAE objects to the real executor. Like the stock loaders they run under the executor's
inference mode, so their weights are inference tensors too.

Nothing here imports ComfyUI at module level: the in-process tests import tiny_models through this
package without a ComfyUI on sys.path.
"""
from __future__ import annotations

from . import tiny_models

CATEGORY = "DOPSD testing"


class _Builder:
    CATEGORY = CATEGORY
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}


class DOPSDTestTinyZImage(_Builder):
    """A tiny Z-Image-Turbo MODEL (comfy.supported_models.ZImage, dim 256)."""
    RETURN_TYPES = ("MODEL",)

    def build(self, seed):
        return (tiny_models.tiny_zimage(seed),)


class DOPSDTestTinyCLIP(_Builder):
    """A tiny CLIP of the family's real text-encoder classes (Qwen3-4B shrunk)."""
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        req = super().INPUT_TYPES()["required"]
        return {"required": {"family": (["flux2-klein", "z-image"],), **req}}

    def build(self, family, seed):
        return (tiny_models.tiny_text_encoder(family, seed + 5),)


class DOPSDTestTinyVAE(_Builder):
    """A tiny comfy.sd.VAE in the flux2 (klein: 128 channels at /16) or flux (Z-Image: 16 at /8) layout."""
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        req = super().INPUT_TYPES()["required"]
        return {"required": {"layout": (list(tiny_models.VAE_LAYOUTS),), **req}}

    def build(self, layout, seed):
        return (tiny_models.tiny_vae(layout, seed + 1),)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (DOPSDTestTinyZImage, DOPSDTestTinyCLIP, DOPSDTestTinyVAE)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DOPSDTestTinyZImage": "Tiny Z-Image-Turbo (test)",
    "DOPSDTestTinyCLIP": "Tiny Qwen3 CLIP (test)",
    "DOPSDTestTinyVAE": "Tiny Flux VAE (test)",
}

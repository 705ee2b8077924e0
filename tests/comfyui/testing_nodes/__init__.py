"""Test-only ComfyUI node pack (never shipped; ComfyUI's own tests/execution/testing_nodes pattern).

tests/comfyui/conftest.py links this folder into the test server's custom_nodes. Its nodes build the
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


class DOPSDTestCancelAt:
    """Passes the MODEL through and arms a Cancel at a fixed progress value of the next progress bar that
    reaches it (the trainer's bar counts optimizer steps), through ComfyUI's own mechanism: the global
    progress hook and interrupt_current_processing, as the frontend's Cancel sets it.
    mode 'hook': the flag is set just before the hook runs, so the hook raises InterruptProcessingException
    inside the trainer's step callback; 'flag': set just after, so the trainer's own check before the next
    step sees it. ComfyUI's throttling of progress updates is off while armed (every step reaches the hook)."""
    CATEGORY = CATEGORY
    FUNCTION = "arm"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "at": ("INT", {"default": 1, "min": 1, "max": 10**6}),
                             "mode": (["hook", "flag"],)}}

    def arm(self, model, at, mode):
        import comfy.model_management as mm
        import comfy.utils as cu
        original = cu.PROGRESS_BAR_HOOK
        throttle = (cu.PROGRESS_THROTTLE_MIN_INTERVAL, cu.PROGRESS_THROTTLE_MIN_PERCENT)
        cu.PROGRESS_THROTTLE_MIN_INTERVAL = cu.PROGRESS_THROTTLE_MIN_PERCENT = 0

        fired = []

        def hook(value, total, preview, **kwargs):
            if value != at or fired:
                return original(value, total, preview, **kwargs)
            fired.append(value)  # one Cancel (bars made before disarming keep this hook)
            cu.set_progress_bar_global_hook(original)
            cu.PROGRESS_THROTTLE_MIN_INTERVAL, cu.PROGRESS_THROTTLE_MIN_PERCENT = throttle
            if mode == "hook":
                mm.interrupt_current_processing(True)
                return original(value, total, preview, **kwargs)  # raises InterruptProcessingException
            result = original(value, total, preview, **kwargs)
            mm.interrupt_current_processing(True)
            return result
        cu.set_progress_bar_global_hook(hook)
        return (model,)


class DOPSDTestCancelInForward:
    """Passes the MODEL through and sets ComfyUI's interrupt flag from inside a forward pass, as a Cancel
    click lands: from a forward hook on the first block of the diffusion model, in the middle of training
    step `at_step`. The trainer's progress bar (one value per optimizer step) says which step runs; the
    block calls of step 1 say how many a step makes, and the flag is set at half of them into step
    `at_step`. The next comfy op raises InterruptProcessingException (comfy/ops.py run_every_op).
    The hook removes itself once it has fired."""
    CATEGORY = CATEGORY
    FUNCTION = "arm"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        # dataset: only to run after D-OPSD Dataset (its encoders never reach the hooked block, but a
        # progress bar of its own would be taken for the trainer's)
        return {"required": {"model": ("MODEL",), "dataset": ("DOPSD_DATASET",),
                             "at_step": ("INT", {"default": 3, "min": 2, "max": 10**6})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # arm again on every queue

    def arm(self, model, dataset, at_step):
        import torch

        import comfy.model_management as mm
        import comfy.utils as cu
        block = next(m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.ModuleList))[0]
        original = cu.PROGRESS_BAR_HOOK
        throttle = (cu.PROGRESS_THROTTLE_MIN_INTERVAL, cu.PROGRESS_THROTTLE_MIN_PERCENT)
        cu.PROGRESS_THROTTLE_MIN_INTERVAL = cu.PROGRESS_THROTTLE_MIN_PERCENT = 0
        st = {"done": 0, "calls": {}, "handle": None}  # steps completed; block calls per step in progress

        def disarm():
            st["handle"].remove()
            st["handle"] = None
            cu.set_progress_bar_global_hook(original)
            cu.PROGRESS_THROTTLE_MIN_INTERVAL, cu.PROGRESS_THROTTLE_MIN_PERCENT = throttle

        def progress(value, total, preview, **kwargs):
            st["done"] = value
            if value >= at_step and st["handle"] is not None:  # past its step unfired: never leave it armed
                disarm()
            return original(value, total, preview, **kwargs)

        def forward_hook(_module, _args, _output):
            step = st["done"] + 1
            st["calls"][step] = st["calls"].get(step, 0) + 1
            if step == at_step and 1 in st["calls"] and st["calls"][step] == max(1, st["calls"][1] // 2):
                disarm()
                mm.interrupt_current_processing(True)
        st["handle"] = block.register_forward_hook(forward_hook)
        cu.set_progress_bar_global_hook(progress)
        return (model,)


class DOPSDTestCancelAfterVAECalls:
    """Passes the VAE through and sets ComfyUI's interrupt flag right after its `calls`-th encode returns,
    as a Cancel click during the dataset node's encoding would: the images are encoded, the captions and
    the teacher contexts (Z-Image: the Qwen3-VL pass, which runs no comfy op) not yet. The VAE's own
    encode is restored once it has fired."""
    CATEGORY = CATEGORY
    FUNCTION = "arm"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "calls": ("INT", {"default": 1, "min": 1, "max": 10**6})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def arm(self, vae, calls):
        import comfy.model_management as mm
        original, seen = vae.encode, []

        def encode(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.append(1)
            if len(seen) == calls:
                del vae.encode  # the class's method again
                mm.interrupt_current_processing(True)
            return out
        vae.encode = encode
        return (vae,)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (DOPSDTestTinyZImage, DOPSDTestTinyCLIP, DOPSDTestTinyVAE,
                                               DOPSDTestCancelAt, DOPSDTestCancelInForward,
                                               DOPSDTestCancelAfterVAECalls)}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DOPSDTestTinyZImage": "Tiny Z-Image-Turbo (test)",
    "DOPSDTestTinyCLIP": "Tiny Qwen3 CLIP (test)",
    "DOPSDTestTinyVAE": "Tiny Flux VAE (test)",
    "DOPSDTestCancelAt": "Cancel at progress value (test)",
    "DOPSDTestCancelInForward": "Cancel inside a forward of a training step (test)",
    "DOPSDTestCancelAfterVAECalls": "Cancel after the VAE's n-th encode (test)",
}

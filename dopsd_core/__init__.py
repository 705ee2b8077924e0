"""dopsd_core: on-policy self-distillation (D-OPSD) LoRA training for step-distilled flow models.

Plain PyTorch; never imports ComfyUI at module level (see dopsd_core/hosts/comfy.py).
"""
__version__ = "0.1.0"

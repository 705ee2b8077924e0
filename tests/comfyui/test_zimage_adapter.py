"""Z-Image through ComfyUI's own classes (a tiny random-weight NextDiT from comfy.supported_models.ZImage,
dim 256, the smallest its z_image_modulation accepts): family detection, its training grid, the family
preset's LoRA targets (docs/method.md), and D-OPSD steps with a teacher context that differs from the student's."""
import pytest
import torch

from comfyui.testing_nodes.tiny_models import tiny_zimage


def test_zimage_family_grid_targets_and_training(comfy_lib, tmp_path):
    import comfy.model_management as mm

    from dopsd_core.denoiser import Record
    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    from dopsd_core.hosts.families import ZImageFamily, detect_family
    from dopsd_core.trainer import TrainConfig, Trainer
    mp = tiny_zimage()
    assert isinstance(detect_family(mp.model), ZImageFamily)
    den = ComfyDenoiser(mp)
    assert den.sigma_grid(4, (16, 8, 8)) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)  # the released training grid

    latent = torch.randn(16, 8, 8)
    # student: caption features; teacher: a different feature sequence (what the Qwen3-VL splice yields)
    student = den.context(torch.randn(1, 7, 64), {}, latent)
    teacher = den.context(torch.randn(1, 11, 64), {}, latent)
    x, s = torch.randn(1, *latent.shape), torch.tensor([0.9])
    with torch.no_grad():
        assert (den.denoise(x, s, teacher) - den.denoise(x, s, student)).abs().max() > 1e-4

    with torch.inference_mode(False):
        make_weights_trainable(den.dm)
        was, mm.in_training = mm.in_training, True  # RoPE: differentiable implementation (as train() sets)
        try:
            trainer = Trainer(den, [Record("a", latent, ["c"], [student], [teacher])],
                              TrainConfig(steps=2, rank=4, alpha=4.0, lr=1e-2, k=4, teacher="ema"), tmp_path / "r")
            targets = set(trainer.lora.targets)
            hist = trainer.run().history
        finally:
            mm.in_training = was
            den.release()
    expected = {f"{blk}.0.{m}" for blk in ("layers", "noise_refiner", "context_refiner")
                for m in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert targets == expected
    assert len(hist) == 2 and all(v > 0 for v in hist)
    assert not any(m._forward_hooks for m in den.dm.modules())

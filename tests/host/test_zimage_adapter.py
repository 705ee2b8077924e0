"""Z-Image through ComfyUI's own classes (a tiny random-weight NextDiT from comfy.supported_models.ZImage,
dim 256 as COMFYUI.md §10 found necessary): family detection, its training grid, the METHOD.md LoRA
targets, and D-OPSD steps with a teacher context that differs from the student's."""
import pytest
import torch


def tiny_zimage():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    unet_config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64,
                   "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                   "axes_dims": [32, 48, 48], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
                   "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                   "pad_tokens_multiple": 32}
    cfg = comfy.supported_models.ZImage(unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    torch.manual_seed(0)
    base = cfg.get_model({})
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())


def test_zimage_family_grid_targets_and_training(comfy_lib, tmp_path):
    import comfy.model_management as mm

    from dopsd_core.denoiser import Record
    from dopsd_core.hosts.comfy import ComfyDenoiser, detect_family, make_weights_trainable
    from dopsd_core.trainer import TrainConfig, Trainer
    mp = tiny_zimage()
    assert detect_family(mp.model) == "z-image"
    den = ComfyDenoiser(mp)
    assert den.sigma_grid(4) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)  # the released training grid

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

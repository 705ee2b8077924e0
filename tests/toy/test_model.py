"""toy/model.py: the x0-prediction ToyDiT returns a velocity (ComfyUI's flow convention)."""
import torch


def test_x0_prediction_returns_velocity_whose_denoised_image_is_the_prediction():
    """With adaLN-zero init the last layer outputs 0: a v-model then denoises to x_t itself, an
    x0-model to the zero image; forward returns v in both cases (ComfyUI's flow convention)."""
    from dopsd_core.toy.denoiser import ToyContext, ToyDenoiser
    from dopsd_core.toy.model import X0_SIGMA_MIN, ToyConfig, ToyDiT
    from dopsd_core.toy.text import ToyTextEncoder
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.9, 0.3])
    outs = {}
    for pred in ("v", "x0"):
        cfg = ToyConfig(width=32, depth=1, heads=2, context_dim=16, text_depth=1, prediction=pred)
        den = ToyDenoiser(ToyDiT(cfg), ToyTextEncoder(16, 1))
        ctx = ToyContext(den.text_encoder.encode(["a red circle"] * 2))
        outs[pred] = den.denoise(x, sigma, ctx)
        v = den.dit(x, sigma, ctx.text)
        assert torch.isfinite(den.dit(x, torch.zeros(2), ctx.text)).all()  # sigma 0 is clipped, not divided by
    assert torch.allclose(outs["v"], x) and torch.allclose(outs["x0"], torch.zeros_like(x), atol=1e-6)
    assert torch.allclose(v, x / sigma.view(-1, 1, 1, 1).clamp(min=X0_SIGMA_MIN))

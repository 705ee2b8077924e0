"""toy/denoiser.py: classifier-free guidance (Guided) extrapolates from the empty caption."""
import torch


def test_guidance_extrapolates_from_the_empty_caption():
    from dopsd_core.toy.denoiser import EMPTY_CAPTION, Guided, ToyContext, random_toy
    from dopsd_core.toy.model import ToyConfig
    den = random_toy(ToyConfig(width=32, depth=1, heads=2, context_dim=16, text_depth=1), gate_std=0.2)
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.9, 0.5])
    ctx = ToyContext(den.text_encoder.encode(["a red circle", "a blue square"]))
    uncond = ToyContext(den.text_encoder.encode([EMPTY_CAPTION] * 2))
    c, u = den.denoise(x, sigma, ctx), den.denoise(x, sigma, uncond)
    assert not torch.allclose(c, u)
    assert torch.equal(Guided(den, 1.0).denoise(x, sigma, ctx), c)
    assert torch.allclose(Guided(den, 3.0).denoise(x, sigma, ctx), u + 3.0 * (c - u), atol=1e-5)
    assert Guided(den, 3.0).sigma_grid(4) == den.sigma_grid(4)  # the rest is the wrapped model's

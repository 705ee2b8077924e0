"""LoRA, LoKr and LoHa: what our hooks add during training is what ComfyUI's stock loader applies from the
file (comfy/weight_adapter through comfy.sd.load_lora_for_models, LoraLoaderModelOnly's call), on tiny
FLUX.2-klein, tiny Z-Image and the toy, within 1e-5. And our LoKr split is ComfyUI's."""
import pytest
import torch

from comfyui.testing_nodes.tiny_models import tiny_klein, tiny_zimage

ADAPTERS = ("lora", "lokr", "loha")
TOL = 1e-5


def _model(family: str):
    if family == "flux2-klein":
        return tiny_klein(), torch.randn(1, 8, 96), torch.randn(128, 4, 4)
    if family == "z-image":
        return tiny_zimage(), torch.randn(1, 8, 64), torch.randn(16, 8, 8)
    from dopsd_core.hosts.comfy_toy import load_toy_comfy
    mp, te = load_toy_comfy()
    cond = te.encode("a red circle on a black background")
    return mp, cond[0][0], torch.randn(mp.model.latent_format.latent_channels, 32, 32)


@pytest.mark.parametrize("family", ["flux2-klein", "z-image", "toy"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_stock_loader_applies_what_training_added(comfy_lib, family, adapter):
    import comfy.model_management as mm

    from dopsd_core.hosts.comfy import ComfyDenoiser, lora_patches_model
    torch.manual_seed(0)
    mp, text, latent = _model(family)
    den = ComfyDenoiser(mp)
    ctx = den.context(text, {}, latent)
    x, sigma = torch.randn(1, *latent.shape), torch.tensor([0.7])
    with torch.no_grad():
        base = den.denoise(x, sigma, ctx)
        lora = den.add_lora(4, 8.0, seed=1, adapter=adapter, factor=4)
        g = torch.Generator().manual_seed(2)
        for p in lora.parameters_list():  # a trained-looking update on every factor
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        hooked = den.denoise(x, sigma, ctx)
        sd = {k: v.clone() for k, v in lora.state_dict_comfy("student").items()}
    den.release()
    assert not any(m._forward_hooks for m in den.dm.modules())
    patched = lora_patches_model(mp, sd)
    mm.load_models_gpu([patched])
    with torch.no_grad():
        stock = ComfyDenoiser(patched).denoise(x, sigma, ctx)
    changed = float((hooked - base).abs().max())
    assert changed > 100 * TOL, f"the {adapter} must change the output ({changed})"
    worst = float((stock - hooked).abs().max())
    assert worst <= TOL, f"{family} {adapter}: stock loader vs training hooks differ by {worst}"


def test_our_lokr_split_is_comfyuis(comfy_lib):
    from comfy.weight_adapter.base import factorization as comfy_factorization

    from dopsd_core.lora import factorization
    for dim in (1, 2, 7, 64, 96, 127, 128, 250, 360, 512, 1024, 3072, 3840, 9216, 10240, 12288):
        for factor in (-1, 1, 2, 4, 8, 16, 32):
            assert factorization(dim, factor) == comfy_factorization(dim, factor), (dim, factor)

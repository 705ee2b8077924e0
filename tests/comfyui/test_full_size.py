"""bench/full_size.py against the real ComfyUI (and transformers): its full-size shape tables are the
ones ComfyUI's detection and modules expect, and its writer's tiny-dims files load through the stock
loader path. Cheap: full-size modules are built on the meta device (no memory), files are tiny.

The full-size runs themselves (bench/full_size.py run) are too slow for CI; their logs are in docs/logs/.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import full_size as fs  # noqa: E402


def _meta_sd(table, real_1d: bool = True) -> dict:
    """The table as a state dict: meta tensors (no memory), 1-D ones real (detection reads a norm's std)."""
    out = {}
    for t in table:
        dtype = fs.TORCH_DTYPES[t.dtype]
        if real_1d and len(t.shape) <= 1 and t.numel <= 1 << 16:
            out[t.key] = torch.ones(t.shape, dtype=torch.float32).to(dtype)
        else:
            out[t.key] = torch.empty(t.shape, dtype=dtype, device="meta")
    return out


def _module_shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _table_shapes(table, rename=None) -> dict:
    return {(rename(t.key) if rename else t.key): tuple(t.shape) for t in table}


@pytest.mark.parametrize("size", ["klein-4b", "klein-9b"])
def test_klein_tables_are_what_comfyui_detects_and_builds(comfy_lib, size):
    import comfy.model_detection
    table = fs.klein_dit(fs.KLEIN[size])
    sd = _meta_sd(table)
    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(cfg).__name__ == "Flux2"
    d = fs.KLEIN[size]
    uc = cfg.unet_config
    assert (uc["hidden_size"], uc["depth"], uc["depth_single_blocks"], uc["context_in_dim"], uc["num_heads"],
            uc["guidance_embed"]) == (d.hidden, d.depth, d.depth_single, d.context, d.hidden // 128, False)
    with torch.device("meta"):
        model = cfg.get_model({}, device="meta")
    # ComfyUI's Flux modules call the QK-norm weights `*_norm.weight`; the files (BFL) `*_norm.scale`
    expected = _module_shapes(model.diffusion_model)
    got = _table_shapes(table, lambda k: k[:-len(".scale")] + ".weight" if k.endswith("_norm.scale") else k)
    assert got == expected
    assert fs.n_params(table) == fs.PUBLISHED[size]


@pytest.mark.parametrize("size", ["klein-4b", "klein-9b"])
def test_klein_fp8_tables_are_detected_as_comfyui_quantized_layers(comfy_lib, size):
    """The fp8 files: block Linears float8_e4m3fn with ComfyUI's weight_scale / comfy_quant, the rest bf16."""
    import comfy.model_detection
    import comfy.utils
    table = fs.klein_dit(fs.KLEIN[size], fp8=True)
    sd = {t.key: (torch.tensor(list(fs.COMFY_QUANT_FP8), dtype=torch.uint8) if t.key.endswith(".comfy_quant")
                  else v) for t, v in zip(table, _meta_sd(table).values())}
    assert comfy.utils.detect_layer_quantization(sd, "") == {"mixed_ops": True}
    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(cfg).__name__ == "Flux2"
    fp8 = [t for t in table if t.dtype == fs.FP8]
    assert len(fp8) == 4 * 2 * fs.KLEIN[size].depth + 2 * fs.KLEIN[size].depth_single
    assert fs.n_params(table) == fs.PUBLISHED[size]
    if size == "klein-4b":  # the published BFL fp8 file: 4,070,624,520 B = data + a header of tens of KB
        assert 0 < fs.PUBLISHED_FILE_BYTES["flux-2-klein-4b-fp8.safetensors"] - fs.n_bytes(table) < 64_000


def test_zimage_table_is_what_comfyui_detects_and_builds(comfy_lib):
    import comfy.model_detection
    table = fs.zimage_dit()
    cfg = comfy.model_detection.model_config_from_unet(_meta_sd(table), "")
    assert type(cfg).__name__ == "ZImage"
    uc = cfg.unet_config
    assert (uc["dim"], uc["n_layers"], uc.get("n_refiner_layers", 2), uc["cap_feat_dim"], uc["n_heads"]) == \
        (3840, 30, 2, 2560, 30)  # n_refiner_layers: the NextDiT default 2 unless detection sets it
    with torch.device("meta"):
        model = cfg.get_model({}, device="meta")
    assert _table_shapes(table) == _module_shapes(model.diffusion_model)


@pytest.mark.parametrize("name,te_model,config", [("qwen3-4b", "QWEN3_4B", "Qwen3_4BConfig"),
                                                  ("qwen3-8b", "QWEN3_8B", "Qwen3_8BConfig")])
def test_text_encoder_tables_are_comfyuis_qwen3(comfy_lib, name, te_model, config):
    import comfy.sd
    import comfy.text_encoders.llama as llama
    table = fs.qwen3_te(fs.QWEN3[name])
    assert comfy.sd.detect_te_model(_meta_sd(table)) == getattr(comfy.sd.TEModel, te_model)
    d, cfg = fs.QWEN3[name], getattr(llama, config)()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == \
        (d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads, d.head_dim, d.vocab)
    assert fs.n_params(table) == fs.PUBLISHED[name]
    file = {"qwen3-4b": "qwen_3_4b.safetensors", "qwen3-8b": "qwen_3_8b.safetensors"}[name]
    assert 0 < fs.PUBLISHED_FILE_BYTES[file] - fs.n_bytes(table) < 64_000  # bf16 + a header


@pytest.mark.parametrize("name,z,flux2", [("flux2-vae", 32, True), ("flux1-vae", 16, False)])
def test_vae_tables_are_comfyuis_autoencoder(comfy_lib, name, z, flux2):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    table = fs.ldm_vae(z, flux2)
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    if flux2:
        ddconfig["batch_norm_latent"] = True
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=z)
    expected = {k: v for k, v in _module_shapes(vae).items() if not k.endswith("num_batches_tracked")}
    if not flux2:  # ae.safetensors has no quant convs (ComfyUI builds them and skips them on load)
        expected = {k: v for k, v in expected.items() if "quant_conv" not in k}
    assert _table_shapes(table) == expected
    assert fs.n_params(table) == fs.PUBLISHED[name]
    file = "flux2-vae.safetensors" if flux2 else "ae.safetensors"
    assert 0 < fs.PUBLISHED_FILE_BYTES[file] - fs.n_bytes(table) < 64_000  # fp32 + a header


def test_qwen3vl_table_is_transformers_qwen3vl(comfy_lib):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**fs.qwen3vl_config()))
    expected = {k: v for k, v in _module_shapes(model).items() if k != "lm_head.weight"}  # tied to the embedding
    assert _table_shapes(fs.qwen3vl()) == expected
    assert fs.n_params(fs.qwen3vl_vision()) == fs.PUBLISHED["qwen3-vl-vision"]


def test_tiny_writer_files_load_through_the_stock_loader(comfy_lib, tmp_path):
    """The same streaming writer at tiny dims: ComfyUI's UNETLoader path loads the bf16 and the fp8
    (pre-quantized) files as FLUX.2, with finite, non-zero weights, and the model runs."""
    from comfy.sd import load_diffusion_model
    from safetensors import safe_open

    from dopsd_core.hosts.families import Flux2KleinFamily, detect_family
    outs = {}
    for fp8 in (False, True):
        path = tmp_path / f"tiny{'_fp8' if fp8 else ''}.safetensors"
        (fs.write_tiny_klein_fp8 if fp8 else fs.write_tiny_klein)(path)
        table = fs.klein_dit(fs.KLEIN["tiny"], fp8=fp8)
        with safe_open(str(path), "pt") as f:
            assert sorted(f.keys()) == sorted(t.key for t in table)
            for t in table:
                v = f.get_tensor(t.key)
                assert tuple(v.shape) == t.shape and v.dtype == fs.TORCH_DTYPES[t.dtype], t.key
                if not t.key.endswith(".comfy_quant"):
                    assert v.float().isfinite().all() and v.float().abs().sum() > 0, t.key
        mp = load_diffusion_model(str(path))
        assert type(mp.model).__name__ == "Flux2" and isinstance(detect_family(mp.model), Flux2KleinFamily)
        x = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outs[fp8] = mp.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx).float()
        assert outs[fp8].isfinite().all()
    # the fp8 file holds the same values as the bf16 one, rounded to e4m3 (scale 0.02 / 64)
    assert torch.allclose(outs[True], outs[False], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("variant", ["bf16", "fp8_e4m3fn", "fp8-file"])
def test_training_keeps_no_cast_copies_of_the_base_for_backward(comfy_lib, tmp_path, monkeypatch, variant):
    """What broke at full size (docs/logs/full_size_klein-4b.txt): ComfyUI computes a base stored in another
    dtype by casting each Linear's weight per forward, and autograd kept every cast copy until backward,
    so the first D-OPSD step without checkpointing of klein-4B (bf16 stored, fp32 compute on the CPU) ran
    a 24 GB machine out of memory. Now the cast copies are saved as recipes and cast again in backward:
    autograd holds (almost) none of those bytes, and losses and LoRA are bit-identical to keeping them.
    Tiny klein from the full-size writer, loaded as UNETLoader loads it (bf16 storage / fp8_e4m3fn
    weight_dtype / a pre-quantized fp8 file), LoRA on, one forward and backward."""
    import comfy.model_management as mm
    from comfy.sd import load_diffusion_model

    import dopsd_core.hosts.comfy as hc
    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    monkeypatch.setattr(mm, "in_training", True)  # as train() sets it: differentiable RoPE
    path = tmp_path / "tiny.safetensors"
    (fs.write_tiny_klein_fp8 if variant == "fp8-file" else fs.write_tiny_klein)(path)
    opts = {"fp8_e4m3fn": {"dtype": torch.float8_e4m3fn}, "bf16": {"dtype": torch.bfloat16}}.get(variant, {})
    kept_bytes, results = {}, {}
    real_pack = hc.SavedWeightRecast.pack

    def counting_pack(self, t):
        out = real_pack(self, t)
        if torch.is_tensor(out):
            self.kept = getattr(self, "kept", 0) + out.numel() * out.element_size()
        return out
    monkeypatch.setattr(hc.SavedWeightRecast, "pack", counting_pack)
    for on in (False, True):
        monkeypatch.setattr(hc, "RECAST_SAVED_WEIGHTS", on)
        with torch.inference_mode():
            mp = load_diffusion_model(str(path), model_options=opts)
        den = ComfyDenoiser(mp)
        make_weights_trainable(den.dm)
        lora = den.add_lora(rank=4, alpha=4.0, seed=0)
        with torch.no_grad():
            for p in lora.student.parameters():  # the up matrices start at zero
                p.add_(0.01)
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 128, 2, 2, generator=g), torch.randn(1, 8, 96, generator=g)
        c = den.context(ctx, {"reference_latents": [x[0:1].clone()]}, x[0])
        with torch.inference_mode(False), torch.enable_grad():
            out = den.denoise(x, torch.tensor([0.6]), c)
            out.square().mean().backward()
        grads = [p.grad.clone() for p in lora.student.parameters()]
        stats = den.recast_stats
        kept_bytes[on] = stats.kept
        results[on] = (out.detach(), grads)
        if on and variant != "fp8-file":
            assert stats.packed > 0 and stats.recast == stats.packed, (stats.packed, stats.recast)
        den.release()
    # fp32 copies of the blocks' Linear weights (the LoRA targets; embedders before them need no input grad)
    block_bytes = sum(m.weight.numel() * 4 for n, m in mp.model.diffusion_model.named_modules()
                      if n.startswith(("double_blocks.", "single_blocks.")) and type(m).__name__ == "Linear")
    if variant == "fp8-file":  # ComfyUI's own QuantLinearFunc saves the stored fp8 weight, never a copy
        assert kept_bytes[True] == kept_bytes[False] < kept_bytes[True] + block_bytes / 4, kept_bytes
    else:
        assert kept_bytes[False] - kept_bytes[True] >= 0.75 * block_bytes, (kept_bytes, block_bytes)
    assert torch.equal(results[True][0], results[False][0])
    assert len(results[True][1]) == len(results[False][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    assert any(a.abs().sum() > 0 for a in results[True][1])


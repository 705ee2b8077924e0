"""LoRA hooks, modes, EMA, ComfyUI-layout files, and a cross-check of the math against peft."""
import pytest
import torch

from dopsd_core.errors import DopsdError
from dopsd_core.lora import LoraSet, find_targets, read_lora_file, save_lora
from dopsd_core.toy.denoiser import LORA_TARGETS


def inputs(den, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *den.latent_shape), generator=g)
    ctx = den.batch_contexts([den.encode_prompt("a red circle on a black background")] * batch)
    return x, torch.full((batch,), 0.75), ctx


def perturb(lora, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters_list():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_wrapped_set_equals_configured_targets(tiny_toy):
    den = tiny_toy()
    lora = den.add_lora(4, 4.0)
    expected = {f"blocks.{i}.{m}" for i in range(den.cfg.depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(lora.targets) == expected
    assert set(lora.wrapped_modules()) == expected
    hooked = {n for n, m in den.dit.named_modules() if m._forward_hooks}
    assert hooked == expected
    with pytest.raises(DopsdError):
        find_targets(den.dit, r"no\.such\.module")


def test_detach_restores_the_base_model_exactly(tiny_toy):
    den = tiny_toy()
    x, s, ctx = inputs(den)
    with torch.no_grad():
        before = den.denoise(x, s, ctx)
        lora = den.add_lora(4, 4.0)
        perturb(lora)
        assert not torch.equal(den.denoise(x, s, ctx), before)
        with lora.use("off"):
            assert torch.equal(den.denoise(x, s, ctx), before)
        lora.detach()
        assert not any(m._forward_hooks for m in den.dit.modules())
        assert torch.equal(den.denoise(x, s, ctx), before)


def test_modes_and_ema(tiny_toy):
    den = tiny_toy()
    x, s, ctx = inputs(den)
    lora = den.add_lora(4, 4.0)
    perturb(lora)
    with torch.no_grad():
        student = den.denoise(x, s, ctx)
        with lora.use("teacher"):  # teacher still B = 0 = base
            teacher = den.denoise(x, s, ctx)
        with lora.use("off"):
            base = den.denoise(x, s, ctx)
    assert torch.equal(teacher, base) and not torch.equal(student, base)
    name = lora.targets[0]
    t_before = lora.teacher[name]["up"].clone()
    s_up = lora.student[name.replace(".", "/")].up.detach().clone()
    lora.ema_update(0.9)
    torch.testing.assert_close(lora.teacher[name]["up"], 0.9 * t_before + 0.1 * s_up)
    lora.copy_student_to_teacher()
    with torch.no_grad(), lora.use("teacher"):
        assert torch.equal(den.denoise(x, s, ctx), student)
    with pytest.raises(ValueError):
        with lora.use("nope"):
            pass


def test_comfy_layout_roundtrip_gives_identical_outputs(tiny_toy, tmp_path):
    den = tiny_toy()
    lora = den.add_lora(4, 8.0)
    perturb(lora)
    path = tmp_path / "lora.safetensors"
    save_lora(lora, path, method="dopsd", model_family="toy")
    sd, meta = read_lora_file(path)
    name = lora.targets[0]
    out_f, in_f = dict(den.dit.named_modules())[name].weight.shape
    assert sd[f"diffusion_model.{name}.lora_up.weight"].shape == (out_f, 4)
    assert sd[f"diffusion_model.{name}.lora_down.weight"].shape == (4, in_f)
    assert float(sd[f"diffusion_model.{name}.alpha"]) == 8.0
    assert len(sd) == 3 * len(lora.targets)
    assert meta["dopsd.rank"] == "4" and meta["dopsd.method"] == "dopsd"
    x, s, ctx = inputs(den)
    with torch.no_grad():
        expected = den.denoise(x, s, ctx)
    fresh = tiny_toy()
    fresh.add_lora(4, 8.0, seed=123).load_state_dict_comfy(sd)
    with torch.no_grad():
        assert torch.equal(fresh.denoise(x, s, ctx), expected)


def test_partial_or_foreign_lora_files_are_refused(tiny_toy, tmp_path):
    den = tiny_toy()
    lora = den.add_lora(4, 4.0)
    sd = lora.state_dict_comfy()
    missing = {k: v for k, v in sd.items() if lora.targets[0] not in k}
    with pytest.raises(DopsdError, match="no lora weights for module"):
        lora.load_state_dict_comfy(missing)
    with pytest.raises(DopsdError, match="rank"):
        tiny_toy().add_lora(8, 4.0).load_state_dict_comfy(sd)
    extra = dict(sd)
    extra["diffusion_model.other.lora_up.weight"] = torch.zeros(2, 2)
    with pytest.raises(DopsdError, match="keys for modules"):
        lora.load_state_dict_comfy(extra)
    with pytest.raises(DopsdError, match="alpha"):
        tiny_toy().add_lora(4, 16.0).load_state_dict_comfy(sd)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DopsdError, match="cannot read"):
        read_lora_file(bad)


def test_rank_must_be_positive(tiny_toy):
    den = tiny_toy()
    with pytest.raises(DopsdError, match="rank"):
        LoraSet(den.dit, find_targets(den.dit, LORA_TARGETS), 0, 1.0)


def test_lora_math_matches_peft():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    x = torch.randn(3, 12)
    ours = LoraSet(base, ["0"], rank=3, alpha=6.0).attach()
    with torch.no_grad():
        ours.student["0"].up.normal_()
        down, up = ours.student["0"].down.detach().clone(), ours.student["0"].up.detach().clone()
        y_ours = base(x)
    ours.detach()
    peft_model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0),
                                         torch.nn.Sequential(torch.nn.Linear(12, 10)))
    peft_model[0].base_layer.load_state_dict(base[0].state_dict())
    with torch.no_grad():
        peft_model[0].lora_A["default"].weight.copy_(down)
        peft_model[0].lora_B["default"].weight.copy_(up)
        y_peft = peft_model(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)


# --- LoKr and LoHa ----------------------------------------------------------------------------------------
def dense_delta(adapter: str, w: dict, scale: float) -> torch.Tensor:
    """The [out, in] update each adapter stands for, written out as its file layout defines it."""
    if adapter == "lora":
        return w["up"] @ w["down"] * scale
    if adapter == "loha":
        return (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * scale
    return torch.kron(w["w1"], w["w2_a"] @ w["w2_b"]) * scale


@pytest.mark.parametrize("dim,factor", [(128, -1), (128, 4), (250, -1), (96, 8), (127, -1), (3072, -1), (64, 16)])
def test_factorization_splits_a_dimension_into_two_factors(dim, factor):
    from dopsd_core.lora import factorization
    m, n = factorization(dim, factor)
    assert m * n == dim and m <= n
    if factor > 0 and dim % factor == 0 and dim >= factor ** 2:
        assert (m, n) == (factor, dim // factor)
    assert factorization(127, -1) == (1, 127)  # a prime has no other split


@pytest.mark.parametrize("adapter", ["lora", "lokr", "loha"])
def test_each_adapter_adds_its_documented_update_and_starts_at_zero(adapter):
    from dopsd_core.lora import LoraSet
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(24, 36))
    x = torch.randn(5, 24)
    base = layer(x).detach()
    lora = LoraSet(layer, ["0"], rank=3, alpha=6.0, adapter=adapter, factor=-1).attach()
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # dW = 0 at the start
    perturb(lora, scale=0.3)
    pair = lora.student["0"]
    w = {k: getattr(pair, k).detach() for k in pair.files}
    want = base + x @ dense_delta(adapter, w, 6.0 / 3).T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # every factor gets a gradient (LoHa's w2_a and LoKr's w2_a start at 0 and must still move)
    layer(x).square().sum().backward()
    assert all(getattr(pair, k).grad is not None and getattr(pair, k).grad.abs().sum() > 0 for k in pair.files)


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_lokr_and_loha_files_round_trip_and_refuse_the_other_adapter(tiny_toy, tmp_path, adapter):
    from dopsd_core.lora import lora_file_spec
    den = tiny_toy()
    x, s, ctx = inputs(den)
    lora = den.add_lora(4, 8.0, adapter=adapter, factor=4)
    perturb(lora)
    lora.ema_update(0.5)
    with torch.no_grad():
        want = den.denoise(x, s, ctx)
    save_lora(lora, tmp_path / "a.safetensors", method="dopsd")
    sd, meta = read_lora_file(tmp_path / "a.safetensors")
    prefix = {"lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    assert {k.rsplit(".", 1)[1] for k in sd} == {*prefix[adapter], "alpha"}  # LyCORIS names, no lora_* keys
    assert lora_file_spec(meta, sd) == {"rank": 4, "alpha": 8.0, "adapter": adapter, "factor": 4 if adapter == "lokr" else -1}
    spec = lora_file_spec({}, sd)  # a file without our metadata: read from its keys
    assert (spec["adapter"], spec["rank"], spec["alpha"]) == (adapter, 4, 8.0)
    fresh = tiny_toy()
    fresh.add_lora(4, 8.0, adapter=adapter, factor=4).load_state_dict_comfy(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(x, s, ctx), want, rtol=0, atol=0)
    with pytest.raises(DopsdError, match=f"is a {adapter} file and this run trains lora"):
        tiny_toy().add_lora(4, 8.0).load_state_dict_comfy(sd)

"""hosts/families.py, CI tier: what works without ComfyUI (matches, sigma_grid, release_encoders, the
dataset build and the cache identities import comfy and are left to the host tests)."""
import re
from types import SimpleNamespace

import pytest
import torch

from dopsd_core.errors import DopsdError
from dopsd_core.family_spec import GENERIC_PHOTO_PROMPTS
from dopsd_core.hosts.families import (FAMILIES, EncoderInputs, Family, Flux2KleinFamily,
                                       ToyFamily, ZImageFamily, family_named)
from dopsd_core.lora import find_targets

KLEIN_TARGETS = [
    "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
    "double_blocks.7.txt_mlp.0", "double_blocks.12.txt_mlp.2", "single_blocks.0.linear1", "single_blocks.3.linear2",
    "single_blocks.23.linear1",
]
KLEIN_OTHERS = [
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.lin", "single_stream_modulation.lin", "final_layer.linear",
    "final_layer.adaLN_modulation.1", "double_blocks.0.img_attn.norm.query_norm", "double_blocks.0.img_mlp.1",
    "double_blocks.0.img_attn", "double_blocks.0", "single_blocks.3.norm.key_norm", "single_blocks.3.norm", "single_blocks.3.pre_norm",
    "single_blocks.3",
    "single_blocks.3.linear2.lora_down", "double_blocks.x.img_attn.qkv", "blocks.0.attn.qkv",
    "layers.5.attention.qkv", "single_blocks.3.linear3", "double_blocks.0.img_mlp.0x",
]
ZIMAGE_TARGETS = [
    "layers.0.attention.qkv", "layers.5.attention.out", "layers.29.feed_forward.w1", "layers.5.feed_forward.w2",
    "layers.5.feed_forward.w3", "noise_refiner.0.attention.qkv", "noise_refiner.0.feed_forward.w2",
    "noise_refiner.1.attention.out", "context_refiner.1.feed_forward.w1", "context_refiner.0.attention.qkv",
]
ZIMAGE_OTHERS = [
    "x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1", "final_layer.linear",
    "final_layer.adaLN_modulation.1", "layers.5.adaLN_modulation.0", "layers.5.attention_norm1",
    "layers.5.ffn_norm1", "layers.5.attention.q_norm", "layers.5.attention.k_norm", "layers.5",
    "layers.5.feed_forward", "layers.5.feed_forward.w4", "layers.5.attention.qkv.lora_up",
    "noise_refiner.0.adaLN_modulation.0", "context_refiner.0.attention_norm2", "blocks.2.mlp.fc1",
    "double_blocks.0.img_attn.qkv", "refiner.0.attention.qkv",
]
TOY_TARGETS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.2.mlp.fc1", "blocks.11.mlp.fc2"]
TOY_OTHERS = [
    "img_in", "txt_in", "t_embedder.0", "txt_pool.0", "blocks.0.adaLN", "final_adaLN", "final", "blocks.0",
    "blocks.0.attn", "blocks.0.mlp", "blocks.0.norm1", "blocks.2.mlp.fc3", "double_blocks.0.attn.qkv",
    "blocks.2.mlp.fc1.lora_down", "layers.5.attention.qkv",
]
CASES = {ToyFamily: (TOY_TARGETS, TOY_OTHERS), Flux2KleinFamily: (KLEIN_TARGETS, KLEIN_OTHERS),
         ZImageFamily: (ZIMAGE_TARGETS, ZIMAGE_OTHERS)}


@pytest.mark.parametrize("cls", FAMILIES)
def test_family_named_returns_a_fresh_instance_of_that_family(cls):
    fam = family_named(cls.name)
    assert type(fam) is cls and fam.name == cls.name
    assert family_named(cls.name) is not fam


def test_family_names_are_the_recorded_ones_and_distinct():
    assert [f.name for f in FAMILIES] == ["toy", "flux2-klein", "z-image"]
    assert len({f.title for f in FAMILIES}) == len(FAMILIES)


@pytest.mark.parametrize("name", ["flux2", "Toy", "zimage", ""])
def test_unknown_family_name_is_refused_naming_the_supported_ones(name):
    with pytest.raises(DopsdError) as info:
        family_named(name)
    msg = str(info.value)
    assert repr(name) in msg and "supported" in msg
    for fam in FAMILIES:
        assert fam.title in msg


@pytest.mark.parametrize("cls", FAMILIES)
def test_lora_targets_match_the_intended_modules_and_nothing_else(cls):
    targets, others = CASES[cls]
    rx = re.compile(cls.lora_targets)
    assert [n for n in targets if not rx.fullmatch(n)] == []
    assert [n for n in others if rx.fullmatch(n)] == []


@pytest.mark.parametrize("cls", FAMILIES)
def test_block_regex_matches_whole_blocks_only(cls):
    targets, _ = CASES[cls]
    rx = re.compile(cls.blocks)
    for name in targets:
        block = ".".join(name.split(".")[:2])
        assert rx.fullmatch(block), block
        assert not rx.fullmatch(name), name


def test_toy_targets_on_the_real_toy_model(tiny_toy):
    """find_targets (fullmatch, 2-D weights) on the toy DiT picks each block's attention and MLP linears."""
    den = tiny_toy()
    depth = sum(1 for n, _ in den.dit.named_modules() if re.fullmatch(r"blocks\.\d+", n))
    want = [f"blocks.{i}.{m}" for i in range(depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert depth >= 2
    assert sorted(find_targets(den.dit, ToyFamily.lora_targets)) == sorted(want)


def test_family_presets():
    assert ToyFamily.fixed_resolution == 32 and Flux2KleinFamily.fixed_resolution is None
    assert Flux2KleinFamily.in_place_blocks and not ZImageFamily.in_place_blocks and not ToyFamily.in_place_blocks
    for fam in FAMILIES:
        assert fam.lr > 0 and fam.rank > 0 and fam.alpha > 0 and fam.sample_steps == 4


def _encoder(calls):
    def encode(caption):
        calls.append(caption)
        return torch.full((1, 2, 3), float(len(caption))), {"pooled_output": torch.ones(1, 3)}
    return encode


def test_klein_teacher_appends_the_released_suffix_and_adds_the_reference_latent():
    calls = []
    teacher = Flux2KleinFamily().teacher_context(_encoder(calls))
    latent = torch.randn(16, 8, 8)
    cond, extra = teacher("a photo of [V] on a beach  ", latent, None)
    suffix = Flux2KleinFamily.teacher_suffix
    assert calls == ["a photo of [V] on a beach" + suffix]  # trailing spaces dropped before the suffix
    assert suffix.startswith(" ") and "reference image" in suffix
    assert cond.shape == (1, 2, 3) and cond[0, 0, 0] == len(calls[0])
    assert torch.equal(extra["pooled_output"], torch.ones(1, 3))  # the encoder's extras are kept
    (ref,) = extra["reference_latents"]
    assert ref.shape == (1, 16, 8, 8) and torch.equal(ref[0], latent)


@pytest.mark.parametrize("cls", [ToyFamily, ZImageFamily, Family])
def test_default_teacher_adds_the_reference_latent_without_the_suffix(cls):
    calls = []
    plain_extra = {"pooled_output": torch.ones(1, 3)}

    def encode(caption):
        calls.append(caption)
        return torch.zeros(1, 2, 3), plain_extra

    latent = torch.randn(4, 8, 8)
    cond, extra = cls().teacher_context(encode)("a photo of [V]", latent, None)
    assert calls == ["a photo of [V]"]
    assert torch.equal(extra["reference_latents"][0], latent[None]) and "pooled_output" in extra
    assert "reference_latents" not in plain_extra  # the encoder's own dict is not modified


def test_encoder_inputs_default_to_none():
    inputs = EncoderInputs()
    assert (inputs.clip, inputs.vae, inputs.toy_text_encoder, inputs.vlm) == (None, None, None, None)
    assert EncoderInputs(clip=1).vae is None


CLIP, VAE, TOY_TE = object(), object(), object()
VLM = SimpleNamespace(folder="qwen3-vl", text_encoder_file=None, dtype="auto")


@pytest.mark.parametrize("cls,inputs,missing", [
    (ToyFamily, EncoderInputs(), "toy_text_encoder"),
    (ToyFamily, EncoderInputs(clip=CLIP, vae=VAE, vlm=VLM), "toy_text_encoder"),
    (Flux2KleinFamily, EncoderInputs(vae=VAE), "clip"),
    (Flux2KleinFamily, EncoderInputs(clip=CLIP), "vae"),
    (Flux2KleinFamily, EncoderInputs(toy_text_encoder=TOY_TE), "clip"),
    (ZImageFamily, EncoderInputs(vae=VAE, vlm=VLM), "clip"),
    (ZImageFamily, EncoderInputs(clip=CLIP, vlm=VLM), "vae"),
    (ZImageFamily, EncoderInputs(clip=CLIP, vae=VAE), "vlm"),
])
def test_check_inputs_names_the_missing_input(cls, inputs, missing):
    with pytest.raises(DopsdError) as info:
        cls().check_inputs(inputs)
    assert re.search(rf"\b{missing}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("cls,inputs", [
    (ToyFamily, EncoderInputs(toy_text_encoder=TOY_TE)),
    (Flux2KleinFamily, EncoderInputs(clip=CLIP, vae=VAE)),
    (ZImageFamily, EncoderInputs(clip=CLIP, vae=VAE, vlm=VLM)),
])
def test_check_inputs_accepts_the_complete_inputs(cls, inputs):
    cls().check_inputs(inputs)  # raises on a missing input (the cases above)


def _assert_prompt_list(prompts):
    assert prompts and all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_generic_prompts_are_non_empty_and_unique():
    _assert_prompt_list(list(GENERIC_PHOTO_PROMPTS))
    for cls in (Flux2KleinFamily, ZImageFamily):
        prompts = cls().generic_prompts()
        assert prompts == list(GENERIC_PHOTO_PROMPTS)
        prompts.append("changed")  # a copy: callers may extend it
        assert cls().generic_prompts() == list(GENERIC_PHOTO_PROMPTS)


def test_toy_generic_prompts_are_the_toys_own():
    from dopsd_core.toy.render import prior_prompts
    prompts = ToyFamily().generic_prompts()
    _assert_prompt_list(prompts)
    assert prompts == prior_prompts()
    assert not set(prompts) & set(GENERIC_PHOTO_PROMPTS)


def test_latent_shapes():
    fmt = SimpleNamespace(latent_channels=16, spacial_downscale_ratio=8)
    assert ZImageFamily().latent_shape(fmt, width=1024, height=768) == (16, 96, 128)
    assert Flux2KleinFamily().latent_shape(SimpleNamespace(latent_channels=128, spacial_downscale_ratio=16),
                                           512, 256) == (128, 16, 32)
    assert ToyFamily().latent_shape(SimpleNamespace(latent_channels=3, spacial_downscale_ratio=1), 512, 256) \
        == (3, 32, 32)  # the toy knows one size only


def test_toy_encode_images_maps_unit_images_to_minus_one_one():
    from dopsd_core.data import ImageItem
    img = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 2, 2)
    (lat,) = ToyFamily().encode_images([ImageItem("a.png", img, ["a"])], vae=None)
    assert torch.equal(lat, img * 2 - 1) and lat.min() == -1 and lat.max() == 1


def test_toy_student_encoder_unwraps_the_comfy_conditioning():
    cond = torch.randn(1, 4, 16)

    class TE:
        def encode(self, caption):
            return [[cond, {"caption": caption}]]

    got, extra = ToyFamily().student_encoder(EncoderInputs(toy_text_encoder=TE()))("a [V]")
    assert got is cond and extra == {"caption": "a [V]"}

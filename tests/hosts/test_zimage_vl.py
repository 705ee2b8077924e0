"""The Z-Image teacher's Qwen3-VL splice on a tiny random Qwen3-VL folder (CI tier: no ComfyUI, no hub).

The folder is written the way Hugging Face ships Qwen3-VL-4B-Instruct (config.json with the text
config's rope_scaling / mrope_section, safetensors weights, tokenizer + preprocessor files); the
Qwen3 text encoder is a state dict in ComfyUI's key layouts.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from dopsd_core.errors import DopsdError
from dopsd_core.hosts import zimage_vl as zv

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
HIDDEN, LAYERS = 64, 3


def tiny_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])  # adds <|endoftext|>
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def hub_config(tok, theta=5e6):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 272, "hidden_size": HIDDEN,
                        "intermediate_size": 96, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                        "max_position_embeddings": 4096, "rope_theta": theta, "tie_word_embeddings": False,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True}},
        "vision_config": {"model_type": "qwen3_vl", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
                          "num_heads": 2, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "out_hidden_size": HIDDEN, "num_position_embeddings": 64,
                          "deepstack_visual_indexes": [0], "hidden_act": "gelu_pytorch_tanh"},
    }


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    folder = tmp_path_factory.mktemp("models") / "Qwen3-VL-tiny"
    tok = tiny_tokenizer()
    cfg = hub_config(tok)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(cfg))  # the hub's layout (rope_scaling, not rope_parameters)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 64 * 64, "longest_edge": 1024 * 32 * 32}).save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": zv.DEFAULT_CHAT_TEMPLATE}))
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    return folder


def qwen3_te_state_dict(seed=1, prefix="model."):
    """A Qwen3 text encoder in ComfyUI's layout (Llama2_: embed_tokens, layers.N.{self_attn,mlp,...}, norm)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed_tokens.weight": (272, HIDDEN), "norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"layers.{i}.self_attn.q_proj.weight": (64, HIDDEN),
                       f"layers.{i}.self_attn.k_proj.weight": (32, HIDDEN),
                       f"layers.{i}.self_attn.v_proj.weight": (32, HIDDEN),
                       f"layers.{i}.self_attn.o_proj.weight": (HIDDEN, 64),
                       f"layers.{i}.self_attn.q_norm.weight": (16,), f"layers.{i}.self_attn.k_norm.weight": (16,),
                       f"layers.{i}.mlp.gate_proj.weight": (96, HIDDEN), f"layers.{i}.mlp.up_proj.weight": (96, HIDDEN),
                       f"layers.{i}.mlp.down_proj.weight": (HIDDEN, 96),
                       f"layers.{i}.input_layernorm.weight": (HIDDEN,),
                       f"layers.{i}.post_attention_layernorm.weight": (HIDDEN,)})
    return {prefix + k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def lm_keys(model):
    return [k for k in model.state_dict() if k.startswith("model.language_model.")]


@pytest.mark.parametrize("prefix", ["model.", "qwen3_4b.transformer.model.", "text_encoders.qwen3_4b.transformer.model."])
def test_splice_matches_every_language_model_key_and_copies_the_weights(vlm_folder, tmp_path, prefix):
    sd = qwen3_te_state_dict(prefix=prefix)
    sd["lm_head.weight"] = torch.zeros(272, HIDDEN)  # present in some files; the splice has no use for it
    source = sd
    if prefix == "model.":  # a standalone text-encoder file, read from disk
        source = tmp_path / "qwen_3_4b.safetensors"
        save_file(sd, str(source))
    model = zv.load_vlm(vlm_folder)
    vision_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.visual.")}
    report = zv.splice_language_model(model, source)
    keys = lm_keys(model)
    assert sorted(report.matched) == sorted(keys) and len(keys) == 2 + 11 * LAYERS
    assert report.unmatched == [] and report.shape_mismatch == [] and report.fraction == 1.0
    assert report.unused == ["lm_head.weight"]
    msd = model.state_dict()
    for k in keys:
        torch.testing.assert_close(msd[k], sd[prefix + k[len("model.language_model."):]], rtol=0, atol=0)
    for k, v in vision_before.items():  # the vision tower keeps Qwen3-VL's weights
        assert torch.equal(msd[k], v)


def test_report_flags_a_wrong_key_and_a_wrong_shape(vlm_folder):
    sd = qwen3_te_state_dict()
    sd["model.layers.0.mlp.gate_projection.weight"] = sd.pop("model.layers.0.mlp.gate_proj.weight")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.randn(48, HIDDEN)
    model = zv.load_vlm(vlm_folder)
    with pytest.raises(DopsdError, match=r"Too few matched.*qwen_3_4b"):
        zv.splice_language_model(model, sd)
    report = zv.splice_language_model(zv.load_vlm(vlm_folder), sd, min_match=0.5)
    assert report.unmatched == ["model.language_model.layers.0.mlp.gate_proj.weight"]
    assert report.shape_mismatch == [("model.language_model.layers.1.self_attn.k_proj.weight", (32, HIDDEN),
                                      (48, HIDDEN))]
    assert report.unused == ["model.layers.0.mlp.gate_projection.weight"]
    assert len(report.matched) == report.total - 2
    assert "1 shape mismatches" in report.summary() and "gate_proj" in report.summary()


def test_a_source_without_qwen3_weights_is_refused_with_the_fix(vlm_folder):
    with pytest.raises(DopsdError, match="CLIPLoader"):
        zv.splice_language_model(zv.load_vlm(vlm_folder), {"encoder.block.0.weight": torch.zeros(2)})


def test_fp8_scaled_text_encoder_is_dequantized(vlm_folder, tmp_path):
    if not zv._FP8_DTYPES:
        pytest.skip("this torch has no float8 dtypes")
    sd = qwen3_te_state_dict()
    w = sd["model.layers.0.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.up_proj.weight"] = (w / 0.01).to(torch.float8_e4m3fn)
    sd["model.layers.0.mlp.up_proj.weight_scale"] = torch.tensor(0.01)
    sd["model.layers.0.mlp.up_proj.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    model = zv.load_vlm(vlm_folder)
    report = zv.splice_language_model(model, tmp_path / "fp8.safetensors")
    assert report.fraction == 1.0 and report.unused == []
    got = model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(got, w, rtol=0.07, atol=2e-3)  # fp8 rounding only: the scale was applied


def image(seed, h=512, w=512):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_teacher_features_shape_and_dependence_on_the_image(vlm_folder):
    te = qwen3_te_state_dict()
    with zv.ZImageVLEncoder(vlm_folder, te, log=None) as enc:
        assert enc.report.fraction == 1.0
        a = enc.encode(image(0), "a photo of [V]")
        a2 = enc.encode(image(0), "a photo of [V]")
        b = enc.encode(image(1), "a photo of [V]")
        text_only = zv.encode(enc.model, enc.processor, "a photo of [V]")
        inputs = zv.build_inputs(enc.processor, "a photo of [V]", image(0))
    assert enc.model is None  # unloaded on exit
    n_img = (512 // 32) ** 2  # one token per 32x32 px (patch 16, merge 2)
    assert int(inputs["mm_token_type_ids"].sum()) == n_img
    assert a.dtype == torch.float32 and a.shape == (1, text_only.shape[1] + n_img + 2, HIDDEN)  # + vision start/end
    assert torch.equal(a, a2)
    assert (a - b).abs().max() > 1e-3, "the teacher context must depend on the target image"
    # the caption tokens come after the image: they see it (causal attention), so they change too
    assert (a[0, -5:] - b[0, -5:]).abs().max() > 1e-4
    ids = inputs["input_ids"][0].tolist()
    tok = enc.processor.tokenizer
    first_img = ids.index(tok.convert_tokens_to_ids("<|image_pad|>"))
    assert tok.decode(ids[:first_img]) == "<|im_start|>user\n<|vision_start|>"
    assert tok.decode(ids[first_img + n_img:]) == "<|vision_end|>a photo of [V]<|im_end|>\n<|im_start|>assistant\n"


def test_hidden_layer_minus_2_is_returned(vlm_folder):
    """Layer −2 = the output of decoder layer N−2 without the final norm (ComfyUI's Qwen3 layer_idx −2)."""
    with zv.ZImageVLEncoder(vlm_folder, qwen3_te_state_dict(), log=None) as enc:
        feats = enc.encode(image(3), "a [V] on a table")
        inputs = zv.build_inputs(enc.processor, "a [V] on a table", image(3))
        captured = {}
        lm = enc.model.model.language_model
        h = lm.layers[LAYERS - 2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            full = enc.model(**inputs, output_hidden_states=True)
        h.remove()
    assert len(full.hidden_states) == LAYERS + 1
    torch.testing.assert_close(feats, full.hidden_states[-2].float())
    torch.testing.assert_close(feats, captured["x"].float())
    assert (feats - full.hidden_states[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(512, 512), (1024, 1024), (100, 100), (300, 1200), (2000, 500), (768, 1365)])
def test_target_size_keeps_the_area_band_and_token_budget(hw):
    h, w = zv.target_size(*hw)
    assert h % 32 == 0 and w % 32 == 0
    assert (h // 32) * (w // 32) <= 1024
    assert 0.85 * 512 ** 2 <= h * w <= 1.07 * 768 ** 2
    assert abs(h / w - hw[0] / hw[1]) / (hw[0] / hw[1]) < 0.15  # aspect kept


def test_folder_checks_name_the_problem(tmp_path, vlm_folder):
    with pytest.raises(DopsdError, match="does not exist.*models/dopsd_vlm"):
        zv.check_vlm_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DopsdError, match="no config.json"):
        zv.check_vlm_folder(tmp_path / "empty")
    wrong = tmp_path / "Qwen2.5-VL"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(DopsdError, match="'qwen2_5_vl' model, not Qwen3-VL"):
        zv.check_vlm_folder(wrong)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DopsdError, match="no .safetensors"):
        zv.check_vlm_folder(pickled)
    assert zv.check_vlm_folder(vlm_folder)["model_type"] == "qwen3_vl"
    nested = tmp_path / "root" / "Qwen-VL" / "Qwen3-VL-4B-Instruct"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    assert zv.find_vlm_folders([tmp_path / "root", tmp_path / "missing"]) == ["Qwen-VL/Qwen3-VL-4B-Instruct"]

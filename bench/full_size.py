"""Full-size random-weight model files in the layout users have, and the user's path through them on the CPU.

    python bench/full_size.py counts                                  # shape tables vs the published sizes
    python bench/full_size.py write --family klein-4b --out /work/fullsize [--tiny] [--only dit,te,vae,fp8]
    python bench/full_size.py run   --family klein-4b --out /work/fullsize --weight-dtype default
    python bench/full_size.py cli   --family klein-4b --out /work/fullsize      # dopsd train/sample, headless
    python bench/full_size.py clean --out /work/fullsize

`write` streams safetensors files tensor by tensor (RAM stays at one chunk, not one model) with the real
checkpoints' key names, shapes and dtypes and cheap seeded random values (a fixed pool of N(0, 1) samples,
scaled: weights std 0.02, norm weights 1 + 0.02 noise, BatchNorm variances near 1; finite, never all
zero). It lays them out as a ComfyUI models/ folder: diffusion_models/, text_encoders/, vae/ and
dopsd_vlm/Qwen3-VL-4B-Instruct/ (config.json, two shards + index, tokenizer and preprocessor files).
Nothing it writes is committed (write it outside the repository; `clean` deletes it).

`run` starts the real ComfyUI (COMFYUI_PATH, default .host/ComfyUI) as a server with --cpu on that folder
and queues, over its HTTP API, what a user queues: the stock UNETLoader / CLIPLoader / VAELoader (and
DOPSDQwen3VLLoader for Z-Image) -> DOPSDDataset -> DOPSDTrainer and DOPSDSFTTrainer with each GPU preset
-> DOPSDSaveLoRA -> the stock LoraLoaderModelOnly, whose output must differ from the base model's. The log
goes to docs/logs/full_size_<family>.txt. See docs/benchmarks.md ("Full size on the CPU").

Where every shape comes from (all in ../shared/design/research/real-sizes.md, which cites them):
* FLUX.2 [klein] 4B / 9B DiT: diffusers scripts/convert_flux2_to_diffusers.py (hidden = heads x 128,
  5 + 20 / 8 + 24 blocks, joint_attention_dim 7680 / 12288) and ComfyUI 0.18.1 comfy/model_detection.py
  (Flux2: global modulation, SwiGLU MLP ratio 3, no biases, BFL key names with `*_norm.scale`).
  fp8 files (flux-2-klein-*-fp8.safetensors, BFL): the 4 / 2 Linear weights of every block in
  float8_e4m3fn, everything else bf16 (this rule reproduces the published 4,070,624,520 B file within
  37 KB); scales in ComfyUI's own format (QUANTIZATION.md, comfy/utils.py convert_old_quants):
  `<layer>.weight_scale` fp32 scalar + `<layer>.comfy_quant` uint8 JSON. The BFL files' scale spelling
  is unverified (no header dump was found).
* Qwen3-4B / Qwen3-8B text encoders: ComfyUI comfy/text_encoders/llama.py Qwen3_4BConfig / Qwen3_8BConfig
  (36 layers, 2560 / 4096 wide, MLP 9728 / 12288, 32 / 8 heads of 128), HF Qwen3ForCausalLM key names;
  the 8B stores lm_head, the 4B ties it (qwen_3_4b.safetensors 8,044,982,048 B, qwen_3_8b 16,381,517,176 B).
* FLUX.2 VAE (flux2-vae.safetensors, fp32): BFL src/flux2/autoencoder.py, LDM AutoencoderKL ch 128,
  ch_mult [1, 2, 4, 4], 2 res blocks, z 32, quant convs, BatchNorm(128) running stats (`bn.*`).
  FLUX.1 VAE (Z-Image's ae.safetensors, fp32): the same without quant convs and BatchNorm, z 16.
* Z-Image-Turbo (z_image_turbo_bf16.safetensors): Tongyi-MAI/Z-Image src/config/model.py and ComfyUI's
  converted key names (comfy/ldm/lumina/model.py NextDiT): dim 3840, 30 layers + 2 noise + 2 context
  refiners, 30 heads, FFN 10240, cap_feat_dim 2560.
* Qwen3-VL-4B-Instruct: transformers models/qwen3_vl/modeling_qwen3_vl.py (module names) and the
  published config (vision depth 24, width 1024, MLP 4096, patch 16, temporal 2, merge 2, 2304 position
  embeddings, deepstack [5, 11, 17], out 2560; the language model = Qwen3-4B's shapes, tied embeddings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# --- shape tables -------------------------------------------------------------------------------------
BF16, F32, F16, FP8, U8 = "BF16", "F32", "F16", "F8_E4M3", "U8"
TORCH_DTYPES = {BF16: torch.bfloat16, F32: torch.float32, F16: torch.float16, FP8: torch.float8_e4m3fn,
                U8: torch.uint8}
BYTES = {BF16: 2, F32: 4, F16: 2, FP8: 1, U8: 1}


@dataclass(frozen=True)
class T:
    """One tensor of a checkpoint: key, shape, stored dtype."""
    key: str
    shape: tuple[int, ...]
    dtype: str = BF16

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class KleinDims:
    hidden: int
    depth: int
    depth_single: int
    context: int  # txt_in width = 3 x the Qwen3 width (hidden states of layers 9, 18, 27 stacked)
    in_channels: int = 128
    mlp_ratio: int = 3
    head_dim: int = 128


KLEIN = {"klein-4b": KleinDims(3072, 5, 20, 7680), "klein-9b": KleinDims(4096, 8, 24, 12288),
         # tiny: ComfyUI detects FLUX.2 at any size (heads = hidden / 128), as tests/comfyui/testing_nodes
         "tiny": KleinDims(128, 1, 2, 96)}


def klein_dit(d: KleinDims, fp8: bool = False) -> list[T]:
    """BFL-native keys of flux-2-klein-{4b,9b}.safetensors (bare, QK-norm as `scale`); fp8: block Linears
    in float8_e4m3fn with ComfyUI's scale tensors."""
    h, mlp = d.hidden, d.hidden * d.mlp_ratio
    out = [T("img_in.weight", (h, d.in_channels)), T("time_in.in_layer.weight", (h, 256)),
           T("time_in.out_layer.weight", (h, h)), T("txt_in.weight", (h, d.context)),
           T("double_stream_modulation_img.lin.weight", (6 * h, h)),
           T("double_stream_modulation_txt.lin.weight", (6 * h, h)),
           T("single_stream_modulation.lin.weight", (3 * h, h))]
    linears = []
    for i in range(d.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            linears += [T(f"{p}_attn.qkv.weight", (3 * h, h)), T(f"{p}_attn.proj.weight", (h, h))]
            out += [T(f"{p}_attn.norm.query_norm.scale", (d.head_dim,)),
                    T(f"{p}_attn.norm.key_norm.scale", (d.head_dim,))]
            linears += [T(f"{p}_mlp.0.weight", (2 * mlp, h)), T(f"{p}_mlp.2.weight", (h, mlp))]
    for i in range(d.depth_single):
        p = f"single_blocks.{i}"
        linears += [T(f"{p}.linear1.weight", (3 * h + 2 * mlp, h)), T(f"{p}.linear2.weight", (h, h + mlp))]
        out += [T(f"{p}.norm.query_norm.scale", (d.head_dim,)), T(f"{p}.norm.key_norm.scale", (d.head_dim,))]
    out += [T("final_layer.linear.weight", (d.in_channels, h)), T("final_layer.adaLN_modulation.1.weight", (2 * h, h))]
    if not fp8:
        return out + linears
    quant = []
    for t in linears:
        layer = t.key[: -len(".weight")]
        quant += [T(t.key, t.shape, FP8), T(f"{layer}.weight_scale", (), F32),
                  T(f"{layer}.comfy_quant", (len(COMFY_QUANT_FP8),), U8)]
    return out + quant


COMFY_QUANT_FP8 = json.dumps({"format": "float8_e4m3fn"}).encode()


@dataclass(frozen=True)
class Qwen3Dims:
    hidden: int
    intermediate: int
    layers: int = 36
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    lm_head: bool = False


QWEN3 = {"qwen3-4b": Qwen3Dims(2560, 9728), "qwen3-8b": Qwen3Dims(4096, 12288, lm_head=True)}


def qwen3_layers(d: Qwen3Dims, prefix: str = "model.") -> list[T]:
    h, hd = d.hidden, d.head_dim
    out = [T(f"{prefix}embed_tokens.weight", (d.vocab, h))]
    for i in range(d.layers):
        p = f"{prefix}layers.{i}."
        out += [T(p + "self_attn.q_proj.weight", (d.heads * hd, h)), T(p + "self_attn.k_proj.weight", (d.kv_heads * hd, h)),
                T(p + "self_attn.v_proj.weight", (d.kv_heads * hd, h)), T(p + "self_attn.o_proj.weight", (h, d.heads * hd)),
                T(p + "self_attn.q_norm.weight", (hd,)), T(p + "self_attn.k_norm.weight", (hd,)),
                T(p + "mlp.gate_proj.weight", (d.intermediate, h)), T(p + "mlp.up_proj.weight", (d.intermediate, h)),
                T(p + "mlp.down_proj.weight", (h, d.intermediate)),
                T(p + "input_layernorm.weight", (h,)), T(p + "post_attention_layernorm.weight", (h,))]
    out.append(T(f"{prefix}norm.weight", (h,)))
    return out


def qwen3_te(d: Qwen3Dims) -> list[T]:
    """qwen_3_4b.safetensors / qwen_3_8b.safetensors: HF Qwen3ForCausalLM keys, bf16."""
    return qwen3_layers(d) + ([T("lm_head.weight", (d.vocab, d.hidden))] if d.lm_head else [])


def _resblock(p: str, cin: int, cout: int) -> list[T]:
    out = [T(p + "norm1.weight", (cin,), F32), T(p + "norm1.bias", (cin,), F32),
           T(p + "conv1.weight", (cout, cin, 3, 3), F32), T(p + "conv1.bias", (cout,), F32),
           T(p + "norm2.weight", (cout,), F32), T(p + "norm2.bias", (cout,), F32),
           T(p + "conv2.weight", (cout, cout, 3, 3), F32), T(p + "conv2.bias", (cout,), F32)]
    if cin != cout:
        out += [T(p + "nin_shortcut.weight", (cout, cin, 1, 1), F32), T(p + "nin_shortcut.bias", (cout,), F32)]
    return out


def _attn(p: str, c: int) -> list[T]:
    out = [T(p + "norm.weight", (c,), F32), T(p + "norm.bias", (c,), F32)]
    for n in ("q", "k", "v", "proj_out"):
        out += [T(f"{p}{n}.weight", (c, c, 1, 1), F32), T(f"{p}{n}.bias", (c,), F32)]
    return out


def ldm_vae(z: int, flux2: bool, ch: int = 128, ch_mult=(1, 2, 4, 4), n_res: int = 2) -> list[T]:
    """LDM AutoencoderKL keys (ComfyUI comfy/ldm/modules/diffusionmodules/model.py Encoder/Decoder), fp32.
    flux2: + quant_conv / post_quant_conv and the BatchNorm running stats over the 2x2-patchified latent."""
    out = [T("encoder.conv_in.weight", (ch, 3, 3, 3), F32), T("encoder.conv_in.bias", (ch,), F32)]
    in_mult = (1, *ch_mult)
    for i, m in enumerate(ch_mult):
        cin, cout = ch * in_mult[i], ch * m
        for j in range(n_res):
            out += _resblock(f"encoder.down.{i}.block.{j}.", cin if j == 0 else cout, cout)
        if i != len(ch_mult) - 1:
            out += [T(f"encoder.down.{i}.downsample.conv.weight", (cout, cout, 3, 3), F32),
                    T(f"encoder.down.{i}.downsample.conv.bias", (cout,), F32)]
    top = ch * ch_mult[-1]
    for part in ("encoder", "decoder"):
        mid = _resblock(f"{part}.mid.block_1.", top, top) + _attn(f"{part}.mid.attn_1.", top) + \
            _resblock(f"{part}.mid.block_2.", top, top)
        if part == "encoder":
            out += mid + [T("encoder.norm_out.weight", (top,), F32), T("encoder.norm_out.bias", (top,), F32),
                          T("encoder.conv_out.weight", (2 * z, top, 3, 3), F32), T("encoder.conv_out.bias", (2 * z,), F32)]
        else:
            out += [T("decoder.conv_in.weight", (top, z, 3, 3), F32), T("decoder.conv_in.bias", (top,), F32)] + mid
    cin = top
    for i in reversed(range(len(ch_mult))):
        cout = ch * ch_mult[i]
        for j in range(n_res + 1):
            out += _resblock(f"decoder.up.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != 0:
            out += [T(f"decoder.up.{i}.upsample.conv.weight", (cout, cout, 3, 3), F32),
                    T(f"decoder.up.{i}.upsample.conv.bias", (cout,), F32)]
    out += [T("decoder.norm_out.weight", (ch,), F32), T("decoder.norm_out.bias", (ch,), F32),
            T("decoder.conv_out.weight", (3, ch, 3, 3), F32), T("decoder.conv_out.bias", (3,), F32)]
    if flux2:
        out += [T("quant_conv.weight", (2 * z, 2 * z, 1, 1), F32), T("quant_conv.bias", (2 * z,), F32),
                T("post_quant_conv.weight", (z, z, 1, 1), F32), T("post_quant_conv.bias", (z,), F32),
                T("bn.running_mean", (4 * z,), F32), T("bn.running_var", (4 * z,), F32)]
    return out


def zimage_dit(dim: int = 3840, n_layers: int = 30, n_refiner: int = 2, cap: int = 2560, ffn: int = 10240,
               head_dim: int = 128, patch_in: int = 64, t_dim: int = 256) -> list[T]:
    """z_image_turbo_bf16.safetensors: ComfyUI-converted NextDiT keys (bare), bf16."""
    mod = min(dim, 256)

    def block(p: str, modulated: bool) -> list[T]:
        out = [T(p + "attention.qkv.weight", (3 * dim, dim)), T(p + "attention.out.weight", (dim, dim)),
               T(p + "attention.q_norm.weight", (head_dim,)), T(p + "attention.k_norm.weight", (head_dim,)),
               T(p + "feed_forward.w1.weight", (ffn, dim)), T(p + "feed_forward.w2.weight", (dim, ffn)),
               T(p + "feed_forward.w3.weight", (ffn, dim)),
               T(p + "attention_norm1.weight", (dim,)), T(p + "ffn_norm1.weight", (dim,)),
               T(p + "attention_norm2.weight", (dim,)), T(p + "ffn_norm2.weight", (dim,))]
        if modulated:
            out += [T(p + "adaLN_modulation.0.weight", (4 * dim, mod)), T(p + "adaLN_modulation.0.bias", (4 * dim,))]
        return out
    out = [T("x_embedder.weight", (dim, patch_in)), T("x_embedder.bias", (dim,)),
           T("cap_embedder.0.weight", (cap,)), T("cap_embedder.1.weight", (dim, cap)), T("cap_embedder.1.bias", (dim,)),
           T("t_embedder.mlp.0.weight", (1024, t_dim)), T("t_embedder.mlp.0.bias", (1024,)),
           T("t_embedder.mlp.2.weight", (t_dim, 1024)), T("t_embedder.mlp.2.bias", (t_dim,)),
           T("x_pad_token", (1, dim)), T("cap_pad_token", (1, dim))]
    for i in range(n_refiner):
        out += block(f"noise_refiner.{i}.", True)
    for i in range(n_refiner):
        out += block(f"context_refiner.{i}.", False)
    for i in range(n_layers):
        out += block(f"layers.{i}.", True)
    out += [T("final_layer.linear.weight", (patch_in, dim)), T("final_layer.linear.bias", (patch_in,)),
            T("final_layer.adaLN_modulation.1.weight", (dim, mod)), T("final_layer.adaLN_modulation.1.bias", (dim,))]
    return out


QWEN3VL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=2560,
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])


def qwen3vl_vision(v: dict = QWEN3VL_VISION) -> list[T]:
    """model.visual.* of Qwen3VLForConditionalGeneration (transformers modeling_qwen3_vl.py), bf16."""
    w, m, p = v["hidden_size"], v["intermediate_size"], "model.visual."
    merged = w * v["spatial_merge_size"] ** 2
    out = [T(p + "patch_embed.proj.weight", (w, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])),
           T(p + "patch_embed.proj.bias", (w,)), T(p + "pos_embed.weight", (v["num_position_embeddings"], w))]
    for i in range(v["depth"]):
        b = f"{p}blocks.{i}."
        out += [T(b + "norm1.weight", (w,)), T(b + "norm1.bias", (w,)), T(b + "norm2.weight", (w,)), T(b + "norm2.bias", (w,)),
                T(b + "attn.qkv.weight", (3 * w, w)), T(b + "attn.qkv.bias", (3 * w,)),
                T(b + "attn.proj.weight", (w, w)), T(b + "attn.proj.bias", (w,)),
                T(b + "mlp.linear_fc1.weight", (m, w)), T(b + "mlp.linear_fc1.bias", (m,)),
                T(b + "mlp.linear_fc2.weight", (w, m)), T(b + "mlp.linear_fc2.bias", (w,))]

    def merger(q: str, norm: int) -> list[T]:
        return [T(q + "norm.weight", (norm,)), T(q + "norm.bias", (norm,)),
                T(q + "linear_fc1.weight", (merged, merged)), T(q + "linear_fc1.bias", (merged,)),
                T(q + "linear_fc2.weight", (v["out_hidden_size"], merged)), T(q + "linear_fc2.bias", (v["out_hidden_size"],))]
    out += merger(p + "merger.", w)
    for i in range(len(v["deepstack_visual_indexes"])):
        out += merger(f"{p}deepstack_merger_list.{i}.", merged)  # use_postshuffle_norm: norm over merged width
    return out


def qwen3vl(d: Qwen3Dims = QWEN3["qwen3-4b"]) -> list[T]:
    return qwen3vl_vision() + qwen3_layers(d, "model.language_model.")


def qwen3vl_config(v: dict = QWEN3VL_VISION, d: Qwen3Dims = QWEN3["qwen3-4b"]) -> dict:
    """The published Qwen3-VL-4B-Instruct config.json values (real-sizes.md section 5)."""
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "tie_word_embeddings": True, "dtype": "bfloat16",
            "text_config": {"model_type": "qwen3_vl_text", "vocab_size": d.vocab, "hidden_size": d.hidden,
                            "intermediate_size": d.intermediate, "num_hidden_layers": d.layers,
                            "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "head_dim": d.head_dim,
                            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                            "rope_theta": 5000000.0, "tie_word_embeddings": True, "attention_bias": False,
                            "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
                            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                             "mrope_interleaved": True}},
            "vision_config": {"model_type": "qwen3_vl", "depth": v["depth"], "hidden_size": v["hidden_size"],
                              "intermediate_size": v["intermediate_size"], "num_heads": v["num_heads"],
                              "patch_size": v["patch_size"], "spatial_merge_size": v["spatial_merge_size"],
                              "temporal_patch_size": v["temporal_patch_size"], "in_channels": v["in_channels"],
                              "out_hidden_size": v["out_hidden_size"], "hidden_act": "gelu_pytorch_tanh",
                              "num_position_embeddings": v["num_position_embeddings"],
                              "deepstack_visual_indexes": v["deepstack_visual_indexes"], "initializer_range": 0.02}}


# Published parameter counts (real-sizes.md section 0, each cross-checked there against a real file size)
PUBLISHED = {
    "klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248, "qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360,
    "flux2-vae": 84_046_115 + 256,  # + the 2 x 128 BatchNorm running stats
    "flux1-vae": 83_819_683, "z-image": 6_154_908_736,
    "qwen3-vl-vision": 415_347_712,
}
# the published file sizes that pin the dtypes (bytes; real-sizes.md section 0)
PUBLISHED_FILE_BYTES = {"flux-2-klein-4b-fp8.safetensors": 4_070_624_520, "qwen_3_4b.safetensors": 8_044_982_048,
                        "qwen_3_8b.safetensors": 16_381_517_176, "flux2-vae.safetensors": 336_211_292,
                        "ae.safetensors": 335_304_388}

VL_FOLDER = "Qwen3-VL-4B-Instruct"


def components() -> dict[str, list[T]]:
    """name -> table (every full-size table the tool writes)."""
    return {"klein-4b": klein_dit(KLEIN["klein-4b"]), "klein-4b-fp8": klein_dit(KLEIN["klein-4b"], fp8=True),
            "klein-9b": klein_dit(KLEIN["klein-9b"]), "klein-9b-fp8": klein_dit(KLEIN["klein-9b"], fp8=True),
            "qwen3-4b": qwen3_te(QWEN3["qwen3-4b"]), "qwen3-8b": qwen3_te(QWEN3["qwen3-8b"]),
            "flux2-vae": ldm_vae(32, True), "flux1-vae": ldm_vae(16, False), "z-image": zimage_dit(),
            "qwen3-vl-vision": qwen3vl_vision(), "qwen3-vl": qwen3vl()}


def n_params(table: list[T]) -> int:
    """Parameters as the published counts count them: every tensor except the fp8 files' scale/quant aux."""
    return sum(t.numel for t in table if not t.key.endswith((".weight_scale", ".comfy_quant")))


def n_bytes(table: list[T]) -> int:
    return sum(t.numel * BYTES[t.dtype] for t in table)


# file name, sub-folder of models/, table name (ComfyUI templates' names: real-sizes.md 1.5, 2, 3, 4)
FAMILY_FILES = {
    "klein-4b": [("diffusion_models", "flux-2-klein-4b.safetensors", "klein-4b"),
                 ("diffusion_models", "flux-2-klein-4b-fp8.safetensors", "klein-4b-fp8"),
                 ("text_encoders", "qwen_3_4b.safetensors", "qwen3-4b"), ("vae", "flux2-vae.safetensors", "flux2-vae")],
    "klein-9b": [("diffusion_models", "flux-2-klein-9b.safetensors", "klein-9b"),
                 ("diffusion_models", "flux-2-klein-9b-fp8.safetensors", "klein-9b-fp8"),
                 ("text_encoders", "qwen_3_8b.safetensors", "qwen3-8b"), ("vae", "flux2-vae.safetensors", "flux2-vae")],
    "z-image": [("diffusion_models", "z_image_turbo_bf16.safetensors", "z-image"),
                ("text_encoders", "qwen_3_4b.safetensors", "qwen3-4b"), ("vae", "ae.safetensors", "flux1-vae"),
                ("dopsd_vlm", VL_FOLDER, "qwen3-vl")],
}
KIND = {"klein-4b": "dit", "klein-4b-fp8": "fp8", "klein-9b": "dit", "klein-9b-fp8": "fp8", "z-image": "dit",
        "qwen3-4b": "te", "qwen3-8b": "te", "flux2-vae": "vae", "flux1-vae": "vae", "qwen3-vl": "vlm"}


# --- the streaming writer -----------------------------------------------------------------------------
class Filler:
    """Cheap seeded values: slices of one pool of N(0, 1) samples (64 MB), scaled per tensor."""

    def __init__(self, seed: int = 0, pool: int = 1 << 24):
        self.pool = torch.randn(pool, generator=torch.Generator().manual_seed(seed))
        self.n = 0

    def values(self, t: T, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of tensor t, as float32."""
        key = t.key
        self.n += 1
        off = (hash_key(key) + start) % (self.pool.numel() - count + 1)
        z = self.pool[off: off + count]
        last = key.rsplit(".", 2)
        if key.endswith("running_var"):
            return 1.0 + 0.5 * z.abs()
        if key.endswith("running_mean"):
            return 0.1 * z
        if "norm" in ".".join(last[-2:]) and key.endswith((".weight", ".scale")) or key.endswith("_norm.scale"):
            return 1.0 + 0.02 * z
        if key.endswith(("_pad_token", "pos_embed.weight", "embed_tokens.weight")):
            return 0.5 * z
        return 0.02 * z


def hash_key(key: str) -> int:
    import zlib
    return zlib.crc32(key.encode()) * 7919


FP8_SCALE = 0.02 / 64.0  # fp8 payload ~ N(0, 64^2) clamped to +-448, times this scale = the bf16 weights' std


def tensor_bytes(t: T, filler: Filler, chunk: int = 1 << 23):
    """Yield the tensor's raw little-endian bytes in chunks (bytes or numpy arrays)."""
    if t.key.endswith(".comfy_quant"):
        yield COMFY_QUANT_FP8
        return
    if t.key.endswith(".weight_scale"):
        yield torch.tensor(FP8_SCALE, dtype=torch.float32).numpy()
        return
    n = t.numel
    chunk = min(chunk, filler.pool.numel() // 2)  # every chunk a slice of the pool at its own offset
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        v = filler.values(t, start, count)
        if t.dtype == FP8:
            v = (v * (64.0 / 0.02)).clamp_(-448, 448)
        yield v.to(TORCH_DTYPES[t.dtype]).view(torch.uint8).numpy()


def write_safetensors(path: Path, table: list[T], filler: Filler, metadata: dict | None = None) -> int:
    """Stream a safetensors file: header from the table, then each tensor's bytes in order. Returns bytes."""
    header, offset = {}, 0
    for t in table:
        size = t.numel * BYTES[t.dtype]
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in table:
            for b in tensor_bytes(t, filler):
                f.write(b)
    os.replace(tmp, path)
    return path.stat().st_size


def write_vl_folder(folder: Path, table: list[T], filler: Filler, comfyui: Path, shard_bytes: int = 5 * 10**9,
                    config: dict | None = None) -> int:
    """A Hugging Face Qwen3-VL folder: config.json, model-0000i-of-0000n.safetensors + index, the Qwen2.5/3
    tokenizer files shipped with ComfyUI (same vocabulary and special tokens), preprocessor_config.json and
    the chat template (dopsd_core.hosts.zimage_vl.DEFAULT_CHAT_TEMPLATE, which gives the same text as the
    real template for one user turn [image, caption])."""
    from dopsd_core.hosts.zimage_vl import DEFAULT_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for t in table:
        b = t.numel * BYTES[t.dtype]
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += b
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, shard, filler, {"format": "pt"})
        weight_map.update({t.key: name for t in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": n_bytes(table)}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config or qwen3vl_config(), indent=1))
    tok = comfyui / "comfy" / "text_encoders" / "qwen25_tokenizer"
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok / f, folder / f)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
         "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216}}, indent=1))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}))
    return total


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")


def write_family(family: str, out: Path, only: set[str] | None = None, log=print, seed: int = 0) -> list[Path]:
    """Write a family's files under out/models/<sub>/ (skipping files already there at the right size)."""
    tables = components()
    filler = Filler(seed)
    written = []
    for sub, name, table_name in FAMILY_FILES[family]:
        if only and KIND[table_name] not in only:
            continue
        table = tables[table_name]
        path = out / "models" / sub / name
        t0 = time.time()
        if table_name == "qwen3-vl":
            size = write_vl_folder(path, table, filler, comfyui_path())
        else:
            header_ok = path.is_file() and path.stat().st_size > n_bytes(table) and \
                path.stat().st_size - n_bytes(table) < 10**6
            if header_ok:
                log(f"[write] {path} exists ({path.stat().st_size:,} B), kept")
                written.append(path)
                continue
            meta = {"dopsd.full_size": "random weights in the released layout (bench/full_size.py); not a model"}
            size = write_safetensors(path, table, filler, meta)
        log(f"[write] {path}: {len(table)} tensors, {n_params(table):,} parameters, {size:,} B "
            f"({time.time() - t0:.0f} s)")
        written.append(path)
    return written


def write_tiny_klein(path: Path, seed: int = 0) -> Path:
    """The same writer at tiny dims (KLEIN['tiny']): what the host tier loads through UNETLoader."""
    write_safetensors(path, klein_dit(KLEIN["tiny"]), Filler(seed, pool=1 << 16))
    return path


def write_tiny_klein_fp8(path: Path, seed: int = 0) -> Path:
    write_safetensors(path, klein_dit(KLEIN["tiny"], fp8=True), Filler(seed, pool=1 << 16))
    return path


# --- counts ---------------------------------------------------------------------------------------------
def count_report() -> list[str]:
    tables = components()
    lines = []
    for name, pub in PUBLISHED.items():
        got = n_params(tables[name])
        lines.append(f"{name:16s} {got:>15,} parameters (published {pub:,}) {'OK' if got == pub else 'MISMATCH'}")
    for sub_files in FAMILY_FILES.values():
        for _sub, fname, tname in sub_files:
            if fname in PUBLISHED_FILE_BYTES:
                lines.append(f"{fname:36s} data {n_bytes(tables[tname]):>15,} B; published file "
                             f"{PUBLISHED_FILE_BYTES[fname]:,} B")
    return list(dict.fromkeys(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("counts", help="parameter counts of the shape tables vs the published sizes")
    w = sub.add_parser("write", help="write a family's random-weight files")
    w.add_argument("--family", choices=list(FAMILY_FILES), required=True)
    w.add_argument("--out", type=Path, default=Path("/work/fullsize"))
    w.add_argument("--only", default="", help="comma list of dit,fp8,te,vae,vlm (default: all)")
    r = sub.add_parser("run", help="the user's path through the stock loaders and the pack's nodes (CPU)")
    r.add_argument("--family", choices=list(FAMILY_FILES), required=True)
    r.add_argument("--out", type=Path, default=Path("/work/fullsize"))
    r.add_argument("--weight-dtype", choices=["default", "fp8_e4m3fn", "fp8-file"], default="default",
                   help="UNETLoader weight_dtype on the bf16 file, or fp8-file: the pre-quantized fp8 file, default")
    r.add_argument("--resolution", type=int, default=64)
    r.add_argument("--images", type=int, default=1)
    r.add_argument("--dopsd-steps", type=int, default=2)
    r.add_argument("--sft-steps", type=int, default=2)
    r.add_argument("--k", type=int, default=2)
    r.add_argument("--states", choices=["all", "one"], default="one")
    r.add_argument("--presets", default="all", help="'all' or preset indices in run order, e.g. 1,0,2")
    r.add_argument("--teacher-check", choices=["off", "warn", "stop"], default="off")
    r.add_argument("--methods", default="dopsd,sft")
    r.add_argument("--prior-prompts", default="", help="DOPSDDataset prior_prompts (default none: faster)")
    r.add_argument("--fp8-text-encoder", action="store_true", help="ComfyUI --fp8_e4m3fn-text-enc")
    r.add_argument("--vlm-dtype", default="auto")
    r.add_argument("--stop-after", choices=["load", "dataset", "all"], default="all")
    r.add_argument("--log", type=Path, default=None)
    r.add_argument("--timeout", type=float, default=6 * 3600)
    h = sub.add_parser("cli", help="the headless CLI (dopsd train, dopsd sample) on the written files (CPU)")
    h.add_argument("--family", choices=list(FAMILY_FILES), required=True)
    h.add_argument("--out", type=Path, default=Path("/work/fullsize"))
    h.add_argument("--weight-dtype", default="default")
    h.add_argument("--vlm-dtype", default="bf16")
    h.add_argument("--text-encoder-dtype", default="default")
    h.add_argument("--resolution", type=int, default=64)
    h.add_argument("--steps", type=int, default=1)
    h.add_argument("--log", type=Path, default=None)
    h.add_argument("--timeout", type=float, default=3 * 3600)
    c = sub.add_parser("clean", help="delete the written files")
    c.add_argument("--out", type=Path, default=Path("/work/fullsize"))
    a = ap.parse_args(argv)
    if a.cmd == "counts":
        print("\n".join(count_report()))
        return 0
    if a.cmd == "write":
        only = {s.strip() for s in a.only.split(",") if s.strip()} or None
        write_family(a.family, a.out, only)
        return 0
    if a.cmd == "clean":
        if (a.out / "models").is_dir():
            shutil.rmtree(a.out / "models")
        return 0
    if a.cmd == "cli":
        from full_size_cli import cli  # noqa: E402 (bench/ is on sys.path when run as a script)
        return cli(a)
    from full_size_run import run  # noqa: E402 (bench/ is on sys.path when run as a script)
    return run(a)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())

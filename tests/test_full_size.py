"""bench/full_size.py (CI tier, no ComfyUI, no big files): its shape tables have the published parameter
counts and dtypes (the published file sizes), and its streaming writer writes valid safetensors files
with finite, non-zero values; the VL folder has what DOPSDQwen3VLLoader checks. The tables are checked
against ComfyUI's own modules and detection in tests/comfyui/test_full_size.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import full_size as fs  # noqa: E402


@pytest.mark.parametrize("name", list(fs.PUBLISHED))
def test_tables_have_the_published_parameter_counts(name):
    assert fs.n_params(fs.components()[name]) == fs.PUBLISHED[name]


def test_published_counts_are_real_sizes_md():
    """The numbers in the table are the ones the research note states (klein-4B 3,875,544,576, ...)."""
    assert fs.PUBLISHED["klein-4b"] == 3_875_544_576 and fs.PUBLISHED["klein-9b"] == 9_078_581_248
    assert fs.PUBLISHED["z-image"] == 6_154_908_736 and fs.PUBLISHED["qwen3-8b"] == 8_190_735_360
    tables = fs.components()
    assert fs.n_params(tables["klein-4b-fp8"]) == fs.PUBLISHED["klein-4b"]
    assert fs.n_params(tables["klein-9b-fp8"]) == fs.PUBLISHED["klein-9b"]
    assert fs.n_params(tables["qwen3-vl"]) == fs.PUBLISHED["qwen3-vl-vision"] + fs.PUBLISHED["qwen3-4b"]
    assert len(tables["klein-4b"]) == 149 and len(tables["klein-9b"]) == 201 and len(tables["z-image"]) == 453


@pytest.mark.parametrize("file,table", [("flux-2-klein-4b-fp8.safetensors", "klein-4b-fp8"),
                                        ("qwen_3_4b.safetensors", "qwen3-4b"), ("qwen_3_8b.safetensors", "qwen3-8b"),
                                        ("flux2-vae.safetensors", "flux2-vae"), ("ae.safetensors", "flux1-vae")])
def test_dtypes_reproduce_the_published_file_sizes(file, table):
    """Data bytes at the table's dtypes = the real file's size less a header of a few tens of KB."""
    assert 0 < fs.PUBLISHED_FILE_BYTES[file] - fs.n_bytes(fs.components()[table]) < 64_000


def test_fp8_layout_quantizes_the_block_linears_only():
    table = fs.components()["klein-4b-fp8"]
    fp8 = {t.key for t in table if t.dtype == fs.FP8}
    assert len(fp8) == 80 and all(k.startswith(("double_blocks.", "single_blocks.")) for k in fp8)
    keys = {t.key for t in table}
    for k in fp8:
        layer = k[: -len(".weight")]
        assert {f"{layer}.weight_scale", f"{layer}.comfy_quant"} <= keys
    assert all(t.dtype == fs.BF16 for t in table if t.key not in fp8 and not t.key.endswith(("_scale", "comfy_quant")))


@pytest.mark.parametrize("fp8", [False, True])
def test_streaming_writer_writes_valid_files(tmp_path, fp8):
    path = tmp_path / "tiny.safetensors"
    (fs.write_tiny_klein_fp8 if fp8 else fs.write_tiny_klein)(path)
    table = fs.klein_dit(fs.KLEIN["tiny"], fp8=fp8)
    assert path.stat().st_size - fs.n_bytes(table) < 64_000
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(t.key for t in table)
        for t in table:
            v = f.get_tensor(t.key)
            assert tuple(v.shape) == t.shape and v.dtype == fs.TORCH_DTYPES[t.dtype], t.key
            if t.key.endswith(".comfy_quant"):
                assert json.loads(bytes(v.tolist())) == {"format": "float8_e4m3fn"}
                continue
            x = v.float()
            assert x.isfinite().all() and x.abs().sum() > 0, t.key
            if t.key.endswith("_norm.scale"):
                assert (x - 1).abs().max() < 0.2  # norm weights near 1
            elif t.dtype == fs.BF16 and x.numel() > 1000:
                assert 0.01 < x.std() < 0.04  # weights ~ N(0, 0.02^2)
    # distinct tensors get distinct values (not one slice repeated)
    with safe_open(str(path), "pt") as f:
        a, b = (f.get_tensor(k).float() for k in ("img_in.weight", "time_in.out_layer.weight"))
    assert not torch.equal(a.flatten()[:1000], b.flatten()[:1000])


def test_vl_folder_has_what_the_loader_checks(tmp_path):
    """The Qwen3-VL folder layout (shards + index, config, tokenizer, preprocessor, chat template) at tiny
    dims, passing dopsd_core's check_vlm_folder."""
    from dopsd_core.hosts.zimage_vl import check_vlm_folder
    fake_comfy = tmp_path / "ComfyUI"
    tok = fake_comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tok.mkdir(parents=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tok / f).write_text("{}")
    vision = dict(fs.QWEN3VL_VISION, depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    table = fs.qwen3vl_vision(vision) + fs.qwen3_layers(fs.Qwen3Dims(64, 96, layers=2, heads=2, kv_heads=1, vocab=512),
                                                         "model.language_model.")
    folder = tmp_path / "Qwen3-VL"
    fs.write_vl_folder(folder, table, fs.Filler(0, pool=1 << 16), fake_comfy, shard_bytes=100_000)
    cfg = check_vlm_folder(folder)
    assert cfg["model_type"] == "qwen3_vl"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) >= 2 and set(index["weight_map"]) == {t.key for t in table}
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())

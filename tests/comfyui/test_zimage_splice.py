"""Z-Image's teacher (the Qwen3-VL splice, docs/method.md) against real ComfyUI objects.

A tiny Z-Image text encoder is built through ComfyUI's own classes (comfy.sd.CLIP with
comfy.text_encoders.z_image's model and tokenizer, sizes shrunk through model_options), a tiny
random Qwen3-VL folder in Hugging Face layout is written to tmp (tokenizer files taken from the
ComfyUI checkout at test time), and a tiny NextDiT from comfy.supported_models.ZImage is trained on
the spliced teacher contexts (all three from comfyui.testing_nodes.tiny_models).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from comfyui.hostutil import graph, node_error_text
from comfyui.testing_nodes.tiny_models import ZIMAGE_TE, tiny_text_encoder, tiny_zimage, write_tiny_qwen3vl

HIDDEN = ZIMAGE_TE["hidden_size"]


@pytest.fixture(scope="module")
def tiny_clip(comfy_lib):
    return tiny_text_encoder("z-image")


@pytest.fixture(scope="module")
def vlm_folder(comfy_lib, tmp_path_factory):
    """Qwen3-VL in the hub layout, text config sized like the tiny Z-Image text encoder (same rope theta,
    so that text-only input must reproduce ComfyUI's Qwen3 encoder exactly once spliced)."""
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("vlm") / "Qwen3-VL-tiny")


def test_text_only_splice_reproduces_comfyuis_zimage_text_encoder(tiny_clip, vlm_folder):
    """Same weights, same tokens, no image: the spliced Qwen3-VL's layer −2 must equal the CONDITIONING
    ComfyUI's Z-Image encoder makes (keys, layer index and layout all right)."""
    from dopsd_core.hosts.zimage_vl import ZImageVLEncoder, encode
    caption = "a photo of [V] on a wooden table"
    student = tiny_clip.encode_from_tokens_scheduled(tiny_clip.tokenize(caption))[0][0]
    with ZImageVLEncoder(vlm_folder, tiny_clip, log=None) as enc:
        assert enc.report.fraction == 1.0 and not enc.report.unmatched and not enc.report.shape_mismatch
        assert enc.report.unused == []  # SDClipModel's logit_scale is not a Qwen3 weight
        text_only = encode(enc.model, enc.processor, caption)
        teacher = enc.encode(torch.rand(3, 96, 64, generator=torch.Generator().manual_seed(0)), caption)
    assert text_only.shape == student.shape == (1, student.shape[1], HIDDEN)
    torch.testing.assert_close(text_only, student.float(), rtol=1e-4, atol=1e-4)
    assert teacher.shape[1] > student.shape[1] and teacher.shape[2] == HIDDEN


def test_splice_teacher_differs_from_student_and_dopsd_trains(tiny_clip, vlm_folder, tmp_path):
    import comfy.model_management as mm

    from dopsd_core.data import ImageItem
    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    from dopsd_core.hosts.zimage_vl import build_zimage_dataset
    from dopsd_core.trainer import TrainConfig, Trainer

    class TinyVae:  # [1, H, W, 3] -> a 16-channel latent at /8, as Z-Image's (Flux) VAE
        def encode(self, pixels):
            x = pixels.permute(0, 3, 1, 2)
            return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16] * 2 - 1

    def encode_text(caption):
        cond = tiny_clip.encode_from_tokens_scheduled(tiny_clip.tokenize(caption))
        return cond[0][0], dict(cond[0][1])

    mp = tiny_zimage_64()
    g = torch.Generator().manual_seed(3)
    items = [ImageItem(f"img{i}", torch.rand(3, 64, 64, generator=g), ["a photo of [V]"]) for i in range(2)]
    freed = []
    ds, report = build_zimage_dataset(mp, items, encode_text, TinyVae(), vlm_folder, tiny_clip,
                                      free_memory=lambda: freed.append(1), log=None)
    assert freed == [1] and report.fraction == 1.0
    assert ds.family == "z-image" and len(ds.records) == 2
    rec0, rec1 = ds.records
    s0, t0 = rec0.student_ctx[0].kwargs["c_crossattn"], rec0.teacher_ctx[0].kwargs["c_crossattn"]
    t1 = rec1.teacher_ctx[0].kwargs["c_crossattn"]
    assert torch.equal(s0, rec1.student_ctx[0].kwargs["c_crossattn"])  # same caption, same student
    assert t0.shape[1] == s0.shape[1] + 2 + (512 // 32) ** 2  # + vision start/end + 256 image tokens
    assert (t0 - t1).abs().max() > 1e-4, "the teacher must see the target image"
    assert not t0.is_inference() and not rec0.x0.is_inference()

    den = ComfyDenoiser(mp)
    x, s = torch.randn(1, *rec0.x0.shape, generator=g), torch.tensor([0.9])
    with torch.no_grad():
        d = (den.denoise(x, s, rec0.teacher_ctx[0]) - den.denoise(x, s, rec0.student_ctx[0])).abs().max()
    assert d > 1e-4, "the splice teacher must change Z-Image's prediction"

    with torch.inference_mode(False):
        make_weights_trainable(den.dm)
        was, mm.in_training = mm.in_training, True
        try:
            trainer = Trainer(den, ds.records, TrainConfig(steps=3, rank=4, alpha=4.0, lr=1e-2, k=4,
                                                            teacher="frozen"), tmp_path / "run")
            hist = trainer.run().history
        finally:
            mm.in_training = was
            den.release()
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in hist)
    up = trainer.lora.parameters_list()[1::2]
    assert any(u.abs().sum() > 0 for u in up), "LoRA B matrices should have moved"


def tiny_zimage_64():
    """test_zimage_adapter's tiny Z-Image reads 64-wide caption features: the tiny Qwen3's width."""
    mp = tiny_zimage()
    assert mp.model.diffusion_model.cap_embedder[1].weight.shape[1] == HIDDEN
    return mp


def _vlm_graph(vlm_name: str):
    """The loader alone, shown by the stock PreviewAny output node (no model needed)."""
    return graph((1, "DOPSDQwen3VLLoader", {"vlm_folder": vlm_name, "dtype": "auto",
                                            "text_encoder": "(the clip input of D-OPSD Dataset)"}),
                 (2, "PreviewAny", {"source": ["1", 0]}))


def _listed(comfy) -> str:
    return json.dumps(comfy.get("/object_info/DOPSDQwen3VLLoader")["DOPSDQwen3VLLoader"]["input"]["required"]["vlm_folder"])


def test_missing_wrong_and_good_vlm_folders_through_the_server(comfy, vlm_folder):
    assert "(no folder in models/dopsd_vlm)" in _listed(comfy)
    entry = comfy.run(_vlm_graph("(no folder in models/dopsd_vlm)"))
    assert entry["status"]["status_str"] == "error"
    msg = node_error_text(entry)
    assert "DopsdError" in msg and "no Qwen3-VL folder found" in msg and "models/dopsd_vlm" in msg, msg

    root = comfy.base / "models" / "dopsd_vlm"
    wrong = root / "Qwen2.5-VL-3B"
    wrong.mkdir(parents=True)
    (wrong / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert "Qwen2.5-VL-3B" in _listed(comfy) and "no folder in" not in _listed(comfy)
    entry = comfy.run(_vlm_graph("Qwen2.5-VL-3B"))
    assert entry["status"]["status_str"] == "error"
    msg = node_error_text(entry)
    assert "DopsdError" in msg and "not Qwen3-VL" in msg and "Qwen3-VL-4B-Instruct" in msg, msg

    shutil.copytree(vlm_folder, root / "Qwen" / "Qwen3-VL-tiny")  # nested one level, as some packs keep them
    assert "Qwen/Qwen3-VL-tiny" in _listed(comfy)
    entry = comfy.run(_vlm_graph("Qwen/Qwen3-VL-tiny"))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    assert comfy.get("/system_stats")["system"]  # the server survives


def _pack():
    """The pack imported as ComfyUI imports it (a package from its folder), in this process."""
    import importlib.util
    import sys
    name = "dopsd_pack_under_test"
    if name not in sys.modules:
        root = Path(__file__).resolve().parents[2]
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    import importlib
    return importlib.import_module(f"{name}.nodes.dataset"), importlib.import_module(f"{name}.nodes.vlm")


def test_dataset_node_builds_zimage_teacher_with_the_vlm_and_refuses_without(tiny_clip, vlm_folder, tmp_path):
    import folder_paths
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))  # the dataset cache goes here, not into ComfyUI
    try:
        dataset, vlm = _pack()

        class TinyVae:
            def encode(self, pixels):
                return torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8).repeat(1, 6, 1, 1)[:, :16]
        mp = tiny_zimage_64()
        images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(9))
        args = dict(model=mp, folder="", caption_template="a photo of [V]", resolution=64, images=images,
                    clip=tiny_clip, vae=TinyVae())
        with pytest.raises(Exception, match="D-OPSD Qwen3-VL Loader"):
            dataset.DOPSDDataset.execute(**args)
        handle = vlm.VLMHandle(str(vlm_folder), None, "fp32")
        ds = dataset.DOPSDDataset.execute(**args, vlm=handle).result[0]
        assert ds.family == "z-image" and len(ds.records) == 2
        s, t = ds.records[0].student_ctx[0].kwargs["c_crossattn"], ds.records[0].teacher_ctx[0].kwargs["c_crossattn"]
        assert t.shape[1] == s.shape[1] + 2 + 256
        assert len(list((tmp_path / "output" / "dopsd" / "cache").glob("*.safetensors"))) == 1
        # SFT's target lives where Z-Image denoises: the VAE latent through Flux's latent format
        # (shift 0.1159, scale 0.3611), as KSampler's process_latent_in puts it
        raw = TinyVae().encode(images[:1])[0]
        assert torch.allclose(ds.records[0].x0, (raw - 0.1159) * 0.3611, atol=1e-6)
        again = dataset.DOPSDDataset.execute(**args, vlm=handle).result[0]  # from the cache, same contexts
        assert torch.equal(again.records[0].teacher_ctx[0].kwargs["c_crossattn"], t)
    finally:
        folder_paths.set_output_directory(old_out)


def test_image_batch_input_is_fitted_like_folder_images(comfy_lib):
    """An IMAGE batch not at the target size is resized like a folder image: with buckets a 2:1 batch
    keeps its width (the blue left strip survives), without them it is centre-cropped to a square;
    a batch already at the target size is used as it is."""
    dataset, _ = _pack()
    images = torch.zeros(2, 80, 160, 3)
    images[..., :20, 2] = 1.0  # blue left eighth
    images[..., 20:, 0] = 1.0  # red elsewhere
    wide = dataset._items_from_images(images, "a [V]", 128, buckets=True)
    assert len(wide) == 2 and wide[0].image.shape == (3, 96, 176) and wide[0].captions == ["a [V]"]
    assert wide[0].image[2, :, :8].mean() > 0.9
    square = dataset._items_from_images(images, "a [V]", 128, buckets=False)
    assert square[0].image.shape == (3, 128, 128) and square[0].image[2].max() < 0.1
    exact = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    kept = dataset._items_from_images(exact, "a [V]", 64, buckets=True)[0].image
    assert torch.equal(kept, exact[0].permute(2, 0, 1))

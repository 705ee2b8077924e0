"""FLUX.2-klein and Z-Image-Turbo through ComfyUI's real executor (server on loopback, HTTP API).

The models are tiny and random (tests/comfyui/testing_nodes/tiny_models.py). klein's DiT is a file in
the released key layout loaded by the stock UNETLoader; what ComfyUI recognises only at full size (the
Z-Image DiT, the Qwen3 CLIPs, the Flux VAEs) comes from the test-only node pack
tests/comfyui/testing_nodes, built with ComfyUI's own classes inside the executor (so, like a stock
loader's, its weights are inference tensors). Z-Image's teacher reads a tiny Qwen3-VL folder in
models/dopsd_vlm through DOPSDQwen3VLLoader.

Per family: the teacher context differs from the student's (D-OPSD Teacher Preview vs the base
model's few-step sample of the plain caption, same seed); dataset -> D-OPSD Trainer (5 steps) ->
D-OPSD Save LoRA -> the stock LoraLoaderModelOnly on the same base reproduces the in-memory trained
MODEL's samples from the family's stock sampler; the base model samples differently. Bad inputs
(unsupported family, wrong family, missing clip/vae/vlm, blank captions) fail with a clear error and
the server keeps serving.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from comfyui.hostutil import fresh_name, graph, latest_latent, node_error_text
from comfyui.testing_nodes import tiny_models

RES = 64  # training and sampling resolution: klein latents 128x4x4, Z-Image 16x8x8
CAPTION = "a photo of [V]"
FROM_CLIP = "(the clip input of D-OPSD Dataset)"
# Same LoRA merged by the same ComfyUI patch code on the same weights: equal up to float rounding.
SAME_TOL = 1e-4
# The 5-step LoRA (rank 4, lr 1e-2) must move the 4-step samples by much more than that. Measured
# (every seed fixed, so deterministic): stock vs trained 0.0 exactly; base vs LoRA max |diff| 7.1e-3
# (klein), 6.7e-2 (Z-Image).
CHANGED_MIN = 1e-3
FAMILIES = ("flux2-klein", "z-image")


# --- graph pieces --------------------------------------------------------------------------------
def loaders(family: str, vlm_name: str | None = None) -> list:
    """Node 1 MODEL, 2 CLIP, 3 VAE (and 4 VLM for Z-Image)."""
    if family == "flux2-klein":
        model = (1, "UNETLoader", {"unet_name": tiny_models.KLEIN_FILE, "weight_dtype": "default"})
        vae = (3, "DOPSDTestTinyVAE", {"layout": "flux2", "seed": 0})
    else:
        model = (1, "DOPSDTestTinyZImage", {"seed": 0})
        vae = (3, "DOPSDTestTinyVAE", {"layout": "flux", "seed": 0})
    nodes = [model, (2, "DOPSDTestTinyCLIP", {"family": family, "seed": 0}), vae]
    if vlm_name:
        nodes.append((4, "DOPSDQwen3VLLoader", {"vlm_folder": vlm_name, "text_encoder": FROM_CLIP, "dtype": "auto"}))
    return nodes


def dataset_node(folder: str, family: str, **overrides) -> tuple:
    inputs = {"model": ["1", 0], "folder": folder, "caption_template": CAPTION, "resolution": RES,
              "clip": ["2", 0], "vae": ["3", 0]}
    if family == "z-image":
        inputs["vlm"] = ["4", 0]
    inputs.update(overrides)
    return (5, "DOPSDDataset", {k: v for k, v in inputs.items() if v is not None})


def trainer_node(run_name: str, checkpointing: bool, model=("1", 0), dataset=("5", 0), **extra) -> tuple:
    return (6, "DOPSDTrainer", {**extra, "model": list(model), "dataset": list(dataset), "steps": 5,
                                "gpu_preset": "family default", "rank": 4, "lr": 1e-2, "optimizer": "adamw",
                                "batch_size": 1, "grad_accum": 1, "seed": 0, "checkpointing": checkpointing,
                                "save_every": 5, "preview_every": 5, "run_name": run_name, "resume": False,
                                "k": 4, "teacher": "ema", "ema_decay": 0.9999, "loss_weight": "x0",
                                "states": "all"})


def sampler_nodes(family: str, model: list, prefix: str) -> list:
    """The family's stock few-step sampling, 4 steps, cfg 1, seed 7, batch 2, then SaveLatent.
    klein: its own resolution-aware Flux2Scheduler, which KSampler does not offer, so the stock
    SamplerCustomAdvanced path of ComfyUI's klein template; Z-Image: KSampler, scheduler simple."""
    text = (20, "CLIPTextEncode", {"clip": ["2", 0], "text": CAPTION})
    if family == "flux2-klein":
        nodes = [text,
                 (21, "RandomNoise", {"noise_seed": 7}),
                 (22, "KSamplerSelect", {"sampler_name": "euler"}),
                 (23, "Flux2Scheduler", {"steps": 4, "width": RES, "height": RES}),
                 (24, "EmptyFlux2LatentImage", {"width": RES, "height": RES, "batch_size": 2}),
                 (25, "BasicGuider", {"model": model, "conditioning": ["20", 0]}),
                 (26, "SamplerCustomAdvanced", {"noise": ["21", 0], "guider": ["25", 0], "sampler": ["22", 0],
                                                "sigmas": ["23", 0], "latent_image": ["24", 0]})]
    else:
        nodes = [text,
                 (24, "EmptySD3LatentImage", {"width": RES, "height": RES, "batch_size": 2}),
                 (26, "KSampler", {"model": model, "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                                   "scheduler": "simple", "positive": ["20", 0], "negative": ["20", 0],
                                   "latent_image": ["24", 0], "denoise": 1.0})]
    return nodes + [(27, "SaveLatent", {"samples": ["26", 0], "filename_prefix": f"latents/{prefix}"})]


def run_ok(comfy, nodes: list) -> dict:
    entry = comfy.run(graph(*nodes))
    assert entry["status"]["status_str"] == "success", node_error_text(entry) or entry["status"]
    return entry


def run_error(comfy, nodes: list) -> str:
    entry = comfy.run(graph(*nodes))
    assert entry["status"]["status_str"] == "error", "the graph should have failed"
    msg = node_error_text(entry)
    assert comfy.get("/system_stats")["system"], "the server must keep serving after a failed prompt"
    return msg


# --- fixtures ------------------------------------------------------------------------------------
def _write_images(folder, n: int, seed: int, caption: str | None = CAPTION) -> None:
    """n small PNGs (a coloured disc on a coloured background) with same-name .txt captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg, fg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        im = Image.new("RGB", (80, 72), bg)  # not square: the dataset centre-crops to RES
        x, y, r = int(rng.integers(20, 60)), int(rng.integers(20, 52)), 14
        ImageDraw.Draw(im).ellipse((x - r, y - r, x + r, y + r), fill=fg)
        im.save(folder / f"img_{i}.png")
        if caption is not None:
            (folder / f"img_{i}.txt").write_text(caption + "\n")


@pytest.fixture(scope="module")
def data_folder(comfy) -> str:
    name = fresh_name("family_data")
    _write_images(comfy.input_dir / name, 2, seed=0)
    return name


@pytest.fixture(scope="module")
def vlm_name(comfy, comfy_lib):
    """A tiny Qwen3-VL folder in models/dopsd_vlm for the module; removed afterwards (test_zimage_splice
    checks the loader's list when that folder is empty)."""
    root = comfy.base / "models" / "dopsd_vlm"
    name = fresh_name("Qwen3-VL-tiny")
    tiny_models.write_tiny_qwen3vl(root / name)
    yield name
    shutil.rmtree(root / name, ignore_errors=True)


def _maybe_vlm(family, request):
    return request.getfixturevalue("vlm_name") if family == "z-image" else None


# --- tests ---------------------------------------------------------------------------------------
def test_both_packs_load_once_and_the_tiny_klein_file_is_a_real_flux2(comfy, comfy_lib):
    log = comfy.log.read_text()
    section = log[log.index("Import times for custom nodes:"):]
    section = section[:section.index("\n\n")] if "\n\n" in section else section
    lines = [ln for ln in section.splitlines() if "seconds" in ln]
    assert sum(ln.rstrip().endswith("/ComfyUI-D-OPSD") for ln in lines) == 1, section
    assert sum(ln.rstrip().endswith("/dopsd_testing_nodes") for ln in lines) == 1, section
    assert "IMPORT FAILED" not in section, section
    info = comfy.get("/object_info")
    assert {"DOPSDTestTinyZImage", "DOPSDTestTinyCLIP", "DOPSDTestTinyVAE", "DOPSDTrainer"} <= set(info)
    assert tiny_models.KLEIN_FILE in json.dumps(info["UNETLoader"]["input"]["required"]["unet_name"])

    # ComfyUI's own detection turns the file back into the same FLUX.2 model (config and outputs)
    from comfy.sd import load_diffusion_model  # (an `import comfy.sd` would shadow the fixture)

    from dopsd_core.hosts.families import Flux2KleinFamily, detect_family
    path = comfy.base / "models" / "diffusion_models" / tiny_models.KLEIN_FILE
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in keys and "double_stream_modulation_img.lin.weight" in keys
    loaded = load_diffusion_model(str(path))
    assert type(loaded.model).__name__ == "Flux2" and isinstance(detect_family(loaded.model), Flux2KleinFamily)
    unet = loaded.model.model_config.unet_config
    assert {k: unet[k] for k in tiny_models.KLEIN_UNET} == tiny_models.KLEIN_UNET
    ref = tiny_models.tiny_klein()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 16, 96, generator=g)
    with torch.no_grad():
        a = loaded.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx)
        b = ref.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_context_differs_from_the_student(comfy, data_folder, family, request):
    """Same base model, same seed and noise, 4 steps on the family grid: the teacher's context (klein:
    caption + suffix + the target as a reference latent; Z-Image: the Qwen3-VL splice of [target,
    caption]) gives other samples than the plain caption."""
    vlm = _maybe_vlm(family, request)
    tag = fresh_name(family.replace("-", ""))
    nodes = loaders(family, vlm) + [
        dataset_node(data_folder, family),
        (7, "DOPSDTeacherPreview", {"model": ["1", 0], "dataset": ["5", 0], "steps": 4, "seed": 3}),
        (8, "SaveLatent", {"samples": ["7", 0], "filename_prefix": f"latents/{tag}_teacher"}),
        (9, "CLIPTextEncode", {"clip": ["2", 0], "text": CAPTION}),
        (10, "DOPSDFewStepSampler", {"model": ["1", 0], "positive": ["9", 0], "steps": 4, "batch_size": 2,
                                     "seed": 3, "width": RES, "height": RES}),
        (11, "SaveLatent", {"samples": ["10", 0], "filename_prefix": f"latents/{tag}_student"}),
    ]
    run_ok(comfy, nodes)
    teacher, student = latest_latent(comfy, f"{tag}_teacher"), latest_latent(comfy, f"{tag}_student")
    shape = (2, 128, 4, 4) if family == "flux2-klein" else (2, 16, 8, 8)
    assert teacher.shape == student.shape == shape
    assert torch.isfinite(teacher).all() and torch.isfinite(student).all()
    diff = (teacher - student).abs().amax(dim=(1, 2, 3))
    assert (diff > 1e-3).all(), f"teacher context did not change the samples: {diff.tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_few_step_sampler_reproduces_the_stock_sampler(comfy, family):
    """D-OPSD Few-Step Sampler (4 steps, seed 7, batch 2) gives the latent of the family's stock
    sampling with the same seed, in the space VAEDecode expects (Z-Image's latent format has a scale
    and shift, so a model-space latent would differ by far more than the tolerance)."""
    tag = fresh_name(f"{family}_sampler")
    nodes = loaders(family) + sampler_nodes(family, ["1", 0], f"{tag}_stock") + [
        (30, "DOPSDFewStepSampler", {"model": ["1", 0], "positive": ["20", 0], "steps": 4, "batch_size": 2,
                                     "seed": 7, "width": RES, "height": RES}),
        (31, "SaveLatent", {"samples": ["30", 0], "filename_prefix": f"latents/{tag}_ours"}),
    ]
    run_ok(comfy, nodes)
    ours, stock = latest_latent(comfy, f"{tag}_ours"), latest_latent(comfy, f"{tag}_stock")
    assert ours.shape == stock.shape
    diff = (ours - stock).abs().max().item()
    assert diff < SAME_TOL, f"few-step sampler differs from the stock sampler by {diff}"


# LoRA on both families; LoKr on klein and LoHa on Z-Image (their LyCORIS files through the same stock loader)
FILE_KEYS = {"lora": ("lora_up.weight", "lora_down.weight"), "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


@pytest.mark.parametrize("family,adapter", [("flux2-klein", "lora"), ("z-image", "lora"), ("flux2-klein", "lokr"),
                                            ("z-image", "loha")])
def test_train_save_and_stock_lora_loader_reproduce_the_trained_model(comfy, data_folder, family, adapter, request):
    vlm = _maybe_vlm(family, request)
    run, lora = fresh_name(f"{family}_run"), fresh_name(f"dopsd/{family}")
    nodes = loaders(family, vlm) + [
        dataset_node(data_folder, family),
        trainer_node(run, checkpointing=family == "flux2-klein", adapter=adapter),  # klein: per-block checkpointing too
        (12, "DOPSDSaveLoRA", {"lora": ["6", 1], "name": lora, "overwrite": False}),
    ] + sampler_nodes(family, ["6", 0], f"{run}_trained")
    run_ok(comfy, nodes)

    lora_file = comfy.loras_dir / f"{lora}.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["dopsd.model_family"] == family and meta["dopsd.steps"] == "5" and meta["dopsd.rank"] == "4"
    target = ("diffusion_model.double_blocks.0.img_attn.qkv" if family == "flux2-klein"
              else "diffusion_model.layers.0.attention.qkv")
    assert {*(f"{target}.{k}" for k in FILE_KEYS[adapter]), f"{target}.alpha"} <= keys
    assert meta["dopsd.adapter"] == adapter
    state = json.loads((comfy.output_dir / "dopsd" / run / "state" / "state.json").read_text())
    assert state["step"] == 5 and len(state["history"]) == 5 and state["model_family"] == family
    assert all(np.isfinite(v) and v > 0 for v in state["history"]), state["history"]
    assert (comfy.output_dir / "dopsd" / run / "previews" / "step_000005.png").is_file()  # family's previewer

    # a new graph: the stock loader applies the saved file to the same base model
    stock_nodes = loaders(family) + [
        (13, "LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": f"{lora}.safetensors", "strength_model": 1.0}),
    ] + sampler_nodes(family, ["13", 0], f"{run}_stock")
    run_ok(comfy, stock_nodes)
    run_ok(comfy, loaders(family) + sampler_nodes(family, ["1", 0], f"{run}_base"))

    trained, stock, base = (latest_latent(comfy, f"{run}_{k}") for k in ("trained", "stock", "base"))
    shape = (2, 128, 4, 4) if family == "flux2-klein" else (2, 16, 8, 8)
    assert trained.shape == stock.shape == base.shape == shape
    assert torch.isfinite(trained).all()
    same = (trained - stock).abs().max().item()
    changed = (base - stock).abs().max().item()
    assert same < SAME_TOL, f"stock-loaded LoRA differs from the trained MODEL by {same}"
    assert changed > CHANGED_MIN, f"the LoRA barely changed the model ({changed})"


def test_dataset_cache_key_covers_the_vae(comfy, data_folder):
    """The on-disk dataset cache is keyed by the VAE as well: another VAE (other weights) makes new latents
    instead of reusing the cached ones."""
    cache_dir = comfy.output_dir / "dopsd" / "cache"
    tag = fresh_name("vae_key")

    def run(vae_seed: int) -> torch.Tensor:
        nodes = loaders("flux2-klein") + [dataset_node(data_folder, "flux2-klein")] + _preview_of_dataset(tag)
        nodes[2] = (3, "DOPSDTestTinyVAE", {"layout": "flux2", "seed": vae_seed})
        run_ok(comfy, nodes)
        return latest_latent(comfy, tag)
    before = set(cache_dir.glob("*.safetensors"))
    first = run(0)
    made = set(cache_dir.glob("*.safetensors")) - before
    second = run(1)
    assert len(set(cache_dir.glob("*.safetensors")) - before - made) == 1, "the other VAE must not hit the cache"
    assert (first - second).abs().max() > 1e-4  # other latents -> other reference latents for the teacher


def test_aspect_buckets_train_in_batches_of_one_size(comfy):
    """Two wide (2:1) and two square images with aspect_buckets on: the cached dataset holds latents of
    two sizes (96x48 and 64x64 px at resolution 64), and batches of 2 train (each batch draws from one
    bucket). With buckets off every latent is the 64x64 square crop."""
    name = fresh_name("bucket_data")
    folder = comfy.input_dir / name
    _write_images(folder, 2, seed=3)
    for i in range(2):
        Image.new("RGB", (160, 80), (40 * i, 200, 90)).save(folder / f"wide_{i}.png")
        (folder / f"wide_{i}.txt").write_text(CAPTION + "\n")
    cache_dir = comfy.output_dir / "dopsd" / "cache"

    def cached_shapes(buckets: bool, train: bool) -> set:
        before = set(cache_dir.glob("*.safetensors"))
        run = fresh_name("bucket_run")
        nodes = loaders("flux2-klein") + [dataset_node(name, "flux2-klein", aspect_buckets=buckets)]
        if train:
            trainer = trainer_node(run, checkpointing=False)
            trainer[2].update(steps=3, batch_size=2, save_every=3, preview_every=0)
            nodes.append(trainer)
        else:
            nodes += _preview_of_dataset()
        run_ok(comfy, nodes)
        if train:
            state = json.loads((comfy.output_dir / "dopsd" / run / "state" / "state.json").read_text())
            assert state["step"] == 3 and all(np.isfinite(v) for v in state["history"])
        (made,) = set(cache_dir.glob("*.safetensors")) - before
        with safe_open(str(made), "pt") as f:
            return {tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".x0")}
    assert cached_shapes(True, train=True) == {(128, 4, 4), (128, 3, 6)}
    assert cached_shapes(False, train=False) == {(128, 4, 4)}


# --- bad inputs ----------------------------------------------------------------------------------
def _flux1_loader() -> tuple:
    return (1, "UNETLoader", {"unet_name": tiny_models.FLUX1_FILE, "weight_dtype": "default"})


def _preview_of_dataset(prefix: str | None = None) -> list:
    prefix = prefix or fresh_name("bad")
    return [(7, "DOPSDTeacherPreview", {"model": ["1", 0], "dataset": ["5", 0], "steps": 4, "seed": 0}),
            (8, "SaveLatent", {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"})]


SUPPORTED_NAMES = ("FLUX.2-klein", "Z-Image-Turbo")


def test_unsupported_family_is_refused_by_dataset_and_trainer(comfy, data_folder):
    """A stock-loaded FLUX.1 [schnell] has no in-context teacher path: the dataset node (before any
    encoding) and the trainer (fed a valid toy dataset) both say so and name the supported families."""
    nodes = [_flux1_loader()] + loaders("flux2-klein")[1:] + [dataset_node(data_folder, "flux2-klein")]
    msg = run_error(comfy, nodes + _preview_of_dataset())
    assert "DopsdError" in msg and "Flux" in msg and all(n in msg for n in SUPPORTED_NAMES), msg

    nodes = [_flux1_loader(),
             (2, "DOPSDToyModelLoader", {}),
             (3, "DOPSDToyConcept", {"shape": "star", "count": 2}),
             (5, "DOPSDDataset", {"model": ["2", 0], "folder": "", "caption_template": "a [V]", "resolution": 32,
                                  "images": ["3", 0], "toy_text_encoder": ["2", 1]}),
             trainer_node(fresh_name("flux1_run"), checkpointing=False)]
    msg = run_error(comfy, nodes)
    assert "DopsdError" in msg and all(n in msg for n in SUPPORTED_NAMES), msg
    assert "no in-context teacher path" in msg, msg


def test_dataset_of_one_family_is_refused_for_another_model(comfy, data_folder):
    """klein dataset, Z-Image MODEL at the trainer: refused before training, naming both families."""
    nodes = loaders("flux2-klein") + [dataset_node(data_folder, "flux2-klein"),
                                      (9, "DOPSDTestTinyZImage", {"seed": 0}),
                                      trainer_node(fresh_name("mismatch"), checkpointing=False, model=("9", 0))]
    msg = run_error(comfy, nodes)
    assert "DopsdError" in msg and re.search(r"built for flux2-klein .*MODEL is z-image", msg), msg


@pytest.mark.parametrize("case", ["klein_without_vae", "zimage_without_vlm", "zimage_without_clip",
                                  "klein_images_with_blank_captions", "klein_blank_caption_file"])
def test_family_inputs_missing_or_blank_show_clear_errors(comfy, data_folder, case):
    """What each family's dataset needs, refused with a message naming the fix (folder errors common to
    all families are in test_toy_errors.py)."""
    family = "flux2-klein" if case.startswith("klein") else "z-image"
    folder, extra, overrides = data_folder, [], {"vlm": None}
    if case == "klein_without_vae":
        overrides["vae"], needle = None, "needs the model's clip (Qwen3) and vae"
    elif case == "zimage_without_vlm":
        needle = "add a 'D-OPSD Qwen3-VL Loader' node"
    elif case == "zimage_without_clip":
        overrides["clip"], needle = None, "needs the model's clip (qwen_3_4b) and vae"
    elif case == "klein_images_with_blank_captions":  # an IMAGE batch of 3 and no caption line for it
        extra = [(9, "EmptyImage", {"width": RES, "height": RES, "batch_size": 3, "color": 0})]
        folder = ""
        overrides.update(images=["9", 0], caption_template="  \n ")
        needle = "caption_template is blank"
    else:  # a folder in which one image's caption file has no caption line
        folder = fresh_name("blank_caption")
        _write_images(comfy.input_dir / folder, 2, seed=1)
        (comfy.input_dir / folder / "img_1.txt").write_text("\n  \n")
        needle = "img_1.txt is blank"
    nodes = loaders(family) + extra + [dataset_node(folder, family, **overrides)] + _preview_of_dataset()
    msg = run_error(comfy, nodes)
    assert "DopsdError" in msg and needle in msg, msg


# --- prior preservation --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["DOPSDTrainer", "DOPSDSFTTrainer"])
def test_the_prior_keeps_the_trained_model_closer_to_the_base_on_prior_prompts(comfy, data_folder, family, method,
                                                                               request):
    """Same data, seed and steps with prior_weight 0 and 5: the trained MODEL's 4-step samples of a prior
    prompt (the dataset node encoded it) stay measurably closer to the base model's with the prior on."""
    prompt = "a photo of a red house"
    drift = {}
    for weight in (0.0, 5.0):
        run, tag = fresh_name(f"prior_{weight}"), fresh_name("prior")
        trainer = trainer_node(run, checkpointing=False)
        trainer = (trainer[0], method, {k: v for k, v in trainer[2].items()
                                        if method == "DOPSDTrainer" or k not in ("k", "teacher", "ema_decay",
                                                                                 "loss_weight", "states")})
        trainer[2].update(steps=12, prior_weight=weight, prior_batch=1, save_every=12, preview_every=0)
        nodes = loaders(family, _maybe_vlm(family, request)) + [
            dataset_node(data_folder, family, prior_prompts=f"{prompt}\n<empty>"), trainer,
            (20, "CLIPTextEncode", {"clip": ["2", 0], "text": prompt}),
            (30, "DOPSDFewStepSampler", {"model": ["1", 0], "positive": ["20", 0], "steps": 4, "batch_size": 2,
                                         "seed": 3, "width": RES, "height": RES, "model_after": ["6", 0]}),
            (31, "SaveLatent", {"samples": ["30", 0], "filename_prefix": f"latents/{tag}"})]
        run_ok(comfy, nodes)
        lat = latest_latent(comfy, tag)  # base (first two), trained (last two), same noise
        drift[weight] = (lat[2:] - lat[:2]).abs().mean().item()
        state = json.loads((comfy.output_dir / "dopsd" / run / "state" / "state.json").read_text())
        assert state["config"]["prior_weight"] == weight
        assert state["prior_prompts"] == ([prompt, ""] if weight else None)
    assert drift[0.0] > CHANGED_MIN and drift[5.0] < 0.7 * drift[0.0], drift

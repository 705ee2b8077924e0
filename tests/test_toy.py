"""The toy world: renderer, shipped weights (small-sample acceptance), demo, quick experiment, data export."""
import json

import pytest
import torch
from PIL import Image

from dopsd_core.data import load_image_folder
from dopsd_core.errors import DopsdError
from dopsd_core.schedule import comfy_simple_sigmas
from dopsd_core.toy.denoiser import BASE_WEIGHTS, UNDISTILLED_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import WEIGHTS as EVALUATOR, load_evaluator
from dopsd_core.toy.metrics import ToyMetrics, concept_training_set
from dopsd_core.toy.render import ALL_SHAPES, CONCEPT_TOKEN, HELD_OUT_SHAPES, export_concept_folder, random_scene, render
from testutil import run_cli

import random

needs_weights = pytest.mark.skipif(
    not (BASE_WEIGHTS.is_file() and UNDISTILLED_WEIGHTS.is_file()),
    reason="toy base weights are not shipped yet (dopsd toy-pretrain + toy-distill regenerate them)")


def test_four_step_grid_is_comfyui_simple_at_shift_3():
    assert comfy_simple_sigmas(3.0, 4) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert comfy_simple_sigmas(3.0, 2) == pytest.approx([1.0, 0.75, 0.0], abs=1e-6)


def test_evaluator_tells_every_shape_apart():
    ev = load_evaluator(EVALUATOR)
    rng = random.Random(123)
    for shape in ALL_SHAPES:
        imgs = torch.stack([render(random_scene(rng, shape)) for _ in range(24)])
        shapes, _ = ev.classify(imgs)
        assert sum(s == shape for s in shapes) >= 22, (shape, shapes)


@pytest.fixture(scope="module")
def shipped():
    """The shipped base, its undistilled parent and metrics on 48 unrelated prompts (a small-sample
    version of `dopsd toy-acceptance`, whose full-size numbers are in docs/toy_acceptance.json)."""
    from dopsd_core.fileio import load_tensors
    size = sum(p.stat().st_size for p in (BASE_WEIGHTS, UNDISTILLED_WEIGHTS, EVALUATOR))
    assert BASE_WEIGHTS.stat().st_size <= 20e6 and size <= 40e6
    torch.manual_seed(0)
    base, undistilled = load_toy_file(BASE_WEIGHTS), load_toy_file(UNDISTILLED_WEIGHTS)
    guidance = float(load_tensors(BASE_WEIGHTS)[1]["dopsd.guidance"])
    m = ToyMetrics(load_evaluator(EVALUATOR), base, n_unrelated=48)
    return base, undistilled, guidance, m, m.evaluate(base)


def _teacher_fidelity(m, base, shape):
    images, captions = concept_training_set(shape)
    return m.teacher_fidelity(base, shape, images, captions, seeds=1)  # 6 images x 4 captions


@needs_weights
def test_shipped_base_retains_unrelated_prompts_at_4_steps(shipped):
    base, _, _, m, distilled = shipped
    assert distilled["retention"] >= 0.85, distilled  # full size: 89.6 % (acceptance >= 90 %: missed by 1 of 192)


@needs_weights
def test_shipped_base_beats_its_parent_sampled_with_its_guidance_at_4_steps(shipped):
    """The distillation is real, with the parent sampled as it was for the distillation (guidance)."""
    from dopsd_core.toy.denoiser import Guided
    _, undistilled, guidance, m, distilled = shipped
    parent = m.evaluate(Guided(undistilled, guidance))
    assert parent["quality_4"] >= 2 * distilled["quality_4"], (parent, distilled)  # full size: 3.5x
    assert distilled["retention"] > parent["retention"]


@needs_weights
@pytest.mark.parametrize("shape", ["star", "heart", "crescent"])
def test_teacher_reproduces_held_out_shapes(shipped, shape):
    base, _, _, m, _ = shipped
    assert _teacher_fidelity(m, base, shape) >= 0.8, shape  # full size: star 88 %, heart 100 %, crescent 96 %


@needs_weights
@pytest.mark.xfail(strict=True, reason="misses the acceptance (docs/toy_acceptance.json): the unguided parent's "
                   "4-step toy-FID is 0.54x the distilled model's, not >= 2x; strict, so it turns red once it passes")
def test_unguided_parent_is_2x_worse_at_4_steps(shipped):
    _, undistilled, _, m, distilled = shipped
    assert m.evaluate(undistilled)["quality_4"] >= 2 * distilled["quality_4"]


@needs_weights
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc, stdout, err = run_cli("demo", "--out", out, "--steps", "3", "--eval-prompts", "24")
    assert rc == 0, err
    for f in ("lora.safetensors", "loss.png", "samples.png", "metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {"concept_fidelity", "retention", "quality_4", "quality_32", "few_step_gap", "drift"}
    assert keys <= set(metrics["base"]) and keys <= set(metrics["lora"])
    assert metrics["base"]["drift"] == 0.0 and metrics["lora"]["drift"] > 0.0
    w, h = Image.open(out / "samples.png").size
    assert w > h > 0  # two rows (base, LoRA) of several samples
    rc, _, err = run_cli("demo", "--out", out, "--steps", "3")
    assert rc == 2 and "already holds" in err


@needs_weights
def test_quick_experiment_writes_a_well_formed_table(tmp_path):
    from dopsd_core.toy.experiment import run_experiment
    res = run_experiment(tmp_path / "exp", quick=True, log=lambda *_: None)
    md = (tmp_path / "exp" / "results.md").read_text()
    assert "| concept | method | concept_fidelity |" in md
    c = HELD_OUT_SHAPES[0]
    for method in ("sft", "dopsd"):
        row = res["summary"][f"main/{c}/{method}"]
        assert 0.0 <= row["concept_fidelity"]["mean"] <= 1.0 and row["retention"]["n"] == 1
        assert f"| {c} | {method} |" in md
    assert "continual" in res["summary"] and "Continual tuning" in md
    assert (tmp_path / "exp" / "results.png").is_file()
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["summary"].keys() == res["summary"].keys()
    # resumable: a second invocation finds every run cached
    lines = []
    run_experiment(tmp_path / "exp", quick=True, log=lines.append)
    assert lines and all(line.endswith("cached") for line in lines)
    # cached runs belong to one base and plan: the full plan in the quick folder is refused, not mixed
    with pytest.raises(DopsdError, match="another toy base or plan"):
        run_experiment(tmp_path / "exp", quick=False, log=lambda *_: None)


def test_concept_export_round_trips_through_train(tmp_path):
    folder = tmp_path / "heart"
    scenes = export_concept_folder("heart", folder, n=4)
    items = load_image_folder(folder, 32)
    assert len(items) == 4 and all(CONCEPT_TOKEN["heart"] in c for i in items for c in i.captions)
    assert torch.allclose(items[0].image, render(scenes[0]), atol=1 / 255 + 1e-6)  # PNG is lossless up to 8 bits
    rc, _, err = run_cli("train", "--data", folder, "--steps", "2", "--out", tmp_path / "run", "--k", "2")
    assert rc == 0, err
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_base_training_stages_run_resume_and_chain(tmp_path):
    """toy-pretrain then toy-distill on a tiny config: checkpoints resume (a finished stage does no
    more steps and writes the same model) and the distilled model differs from its parent."""
    from dopsd_core.fileio import load_tensors
    from dopsd_core.toy.model import ToyConfig
    from dopsd_core.toy.pretrain import distill, pretrain, probe
    cfg = ToyConfig(width=32, depth=1, heads=2, context_dim=16, text_depth=1)
    first = pretrain(tmp_path, steps=3, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    sd_first, _ = load_tensors(first)
    again = pretrain(tmp_path, steps=3, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    sd_again, _ = load_tensors(again)
    assert all(torch.equal(sd_first[k], sd_again[k]) for k in sd_first)
    out = distill(tmp_path, steps=2, batch=4, n_traj=8, save_every=1, probe_every=0)
    assert (tmp_path / "trajectories.safetensors").is_file()
    parent, child = load_toy_file(first), load_toy_file(out)
    assert child.cfg == cfg
    diff = [not torch.equal(a, b) for a, b in zip(parent.dit.state_dict().values(), child.dit.state_dict().values())]
    assert any(diff)
    res = probe(child, n=6, steps=2)
    assert set(res) == {"shape_acc", "joint_acc", "ref_copy_acc"} and all(0.0 <= v <= 1.0 for v in res.values())
    # a finished distillation continues with data-supervised copies (one more step, at another lr)
    more = load_toy_file(distill(tmp_path, steps=3, batch=4, n_traj=8, save_every=1, probe_every=0, copy_batch=2,
                                 copy_from=2, lr=2e-5))
    assert any(not torch.equal(a, b) for a, b in zip(child.dit.state_dict().values(), more.dit.state_dict().values()))
    _, meta = load_tensors(tmp_path / "distilled.safetensors")
    assert meta["dopsd.copy_batch"] == "2" and meta["dopsd.last_lr"] == "2e-05"
    # another parent: the cached trajectories and the half-done student are refused, not reused
    pretrain(tmp_path, steps=4, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    with pytest.raises(DopsdError, match="delete it"):
        distill(tmp_path, steps=4, batch=4, n_traj=8, save_every=1, probe_every=0)
    (tmp_path / "trajectories.safetensors").unlink()
    with pytest.raises(DopsdError, match="distils another pretrained model"):
        distill(tmp_path, steps=4, batch=4, n_traj=8, save_every=1, probe_every=0)


def test_copy_examples_show_the_target_and_the_loss_asks_for_it():
    from dopsd_core.toy.pretrain import _copy_loss, make_copy_example
    rng = random.Random(1)
    assert all(torch.equal(e.ref, e.target) for e in (make_copy_example(rng) for _ in range(300)))

    class Oracle:  # returns the reference (= the target) whatever the state: the loss must be zero
        text_encoder = staticmethod(lambda ids: ids)

        def denoise(self, x_t, sigma, ctx):
            return ctx.ref

    class Identity(Oracle):  # returns its noisy input: a positive loss
        def denoise(self, x_t, sigma, ctx):
            return x_t
    def args():
        return 8, [1.0, 0.9, 0.75, 0.5, 0.0], random.Random(2), torch.Generator().manual_seed(0), "cpu"
    assert _copy_loss(Oracle(), *args()).item() == 0.0
    assert _copy_loss(Identity(), *args()).item() > 0.05


def test_blob_outlines_are_deterministic_and_varied():
    from dopsd_core.toy.render import Scene, random_blob_scene
    assert torch.equal(render(random_blob_scene(random.Random(3))), render(random_blob_scene(random.Random(3))))
    # the same placement for every seed: only the outline differs
    masks = [render(Scene(f"blob:{seed}", "white", "black", 16.0, 16.0, 10.0))[0] > 0.5 for seed in range(12)]
    cover = [m.float().mean().item() for m in masks]
    assert all(0.03 < c < 0.33 for c in cover), cover  # never empty, never the whole disc
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (i, j, iou)


def test_pretraining_mixes_empty_captions_copies_and_blobs():
    from dopsd_core.toy.pretrain import COPY_PROB, DROP_PROB, EMPTY_TOKENS, make_example
    from dopsd_core.toy.text import CONCEPT_TOKENS, TOKEN_ID
    rng = random.Random(0)
    plain = [make_example(rng, 0.0) for _ in range(2000)]
    assert all(e.ref is None for e in plain)
    empty = sum(e.tokens == EMPTY_TOKENS for e in plain) / len(plain)
    assert abs(empty - DROP_PROB) < 0.03, empty
    refs = [make_example(rng, 1.0) for _ in range(1000)]
    copies = sum(torch.equal(e.ref, e.target) for e in refs) / len(refs)
    assert abs(copies - COPY_PROB) < 0.05, copies
    concept_ids = {TOKEN_ID[t] for t in CONCEPT_TOKENS}
    assert all(e.tokens != EMPTY_TOKENS for e in refs)
    assert 0.3 < sum(bool(concept_ids & set(e.tokens)) for e in refs) / len(refs) < 0.95


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


def test_x0_prediction_returns_velocity_whose_denoised_image_is_the_prediction():
    """With adaLN-zero init the last layer outputs 0: a v-model then denoises to x_t itself, an
    x0-model to the zero image; forward returns v in both cases (ComfyUI's flow convention)."""
    from dopsd_core.toy.denoiser import ToyContext, ToyDenoiser
    from dopsd_core.toy.model import X0_SIGMA_MIN, ToyConfig, ToyDiT
    from dopsd_core.toy.text import ToyTextEncoder
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.9, 0.3])
    outs = {}
    for pred in ("v", "x0"):
        cfg = ToyConfig(width=32, depth=1, heads=2, context_dim=16, text_depth=1, prediction=pred)
        den = ToyDenoiser(ToyDiT(cfg), ToyTextEncoder(16, 1))
        ctx = ToyContext(den.text_encoder.encode(["a red circle"] * 2))
        outs[pred] = den.denoise(x, sigma, ctx)
        v = den.dit(x, sigma, ctx.text)
        assert torch.isfinite(den.dit(x, torch.zeros(2), ctx.text)).all()  # sigma 0 is clipped, not divided by
    assert torch.allclose(outs["v"], x) and torch.allclose(outs["x0"], torch.zeros_like(x), atol=1e-6)
    assert torch.allclose(v, x / sigma.view(-1, 1, 1, 1).clamp(min=X0_SIGMA_MIN))

"""FLUX.2-klein through ComfyUI's own model classes (a tiny random-weight Flux2 built in-process from
comfy.supported_models.Flux2 by comfyui.testing_nodes.tiny_models): the reference-latent teacher differs
from the student, and D-OPSD steps train the LoRA (backward through FLUX.2 needs in_training and the
in-place fix)."""
import pytest
import torch

from comfyui.testing_nodes.tiny_models import tiny_klein


def test_klein_family_grid_and_lora_targets(comfy_lib):
    from comfy_extras.nodes_flux import Flux2Scheduler

    from dopsd_core.hosts.comfy import ComfyDenoiser
    from dopsd_core.hosts.families import Flux2KleinFamily, detect_family
    mp = tiny_klein()
    assert isinstance(detect_family(mp.model), Flux2KleinFamily)
    den = ComfyDenoiser(mp)
    grid = den.sigma_grid(4, (128, 4, 4))
    assert len(grid) == 5 and grid[0] == pytest.approx(1.0) and grid[-1] == 0.0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    # per latent size, as ComfyUI's own Flux2Scheduler node computes it for that image size (latents /16)
    for h, w in ((4, 4), (3, 6), (64, 64), (48, 80)):
        stock = Flux2Scheduler.execute(steps=4, width=w * 16, height=h * 16).args[0]
        assert den.sigma_grid(4, (128, h, w)) == pytest.approx([float(s) for s in stock], abs=1e-6)
    assert den.sigma_grid(4, (128, 3, 6)) != den.sigma_grid(4, (128, 64, 64))
    lora = den.add_lora(4, 8.0)
    expected = {f"double_blocks.0.{s}.{m}" for s in ("img_attn", "txt_attn") for m in ("qkv", "proj")}
    expected |= {f"double_blocks.0.{s}.{m}" for s in ("img_mlp", "txt_mlp") for m in ("0", "2")}
    expected |= {f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear1", "linear2")}
    assert set(lora.targets) == expected
    den.release()
    assert not any(m._forward_hooks for m in den.dm.modules())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_klein_reference_teacher_differs_and_dopsd_trains(comfy_lib, tmp_path, checkpointing):
    import comfy.model_management as mm

    from dopsd_core.denoiser import Record
    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    from dopsd_core.trainer import TrainConfig, Trainer
    mp = tiny_klein()
    den = ComfyDenoiser(mp)
    latent = torch.randn(128, 4, 4)
    text = torch.randn(1, 8, 96)
    student = den.context(text, {}, latent)
    teacher = den.context(text, {"reference_latents": [latent[None]]}, latent)
    assert "ref_latents" in teacher.kwargs and "ref_latents" not in student.kwargs
    x = torch.randn(1, *latent.shape)
    s = torch.tensor([0.8])
    with torch.no_grad():
        d = (den.denoise(x, s, teacher) - den.denoise(x, s, student)).abs().max().item()
    assert d > 1e-4, "the reference latent must change the teacher's prediction"

    records = [Record("a", latent, ["c"], [student], [teacher])]
    was = mm.in_training
    with torch.inference_mode(False):
        make_weights_trainable(den.dm)
        mm.in_training = True
        try:
            cfg = TrainConfig(steps=3, rank=4, alpha=4.0, lr=1e-2, k=2, teacher="frozen", checkpointing=checkpointing)
            trainer = Trainer(den, records, cfg, tmp_path / "run")
            hist = trainer.run().history
        finally:
            mm.in_training = was
            den.release()
    assert len(hist) == 3 and all(v > 0 for v in hist)
    up = [p for n, p in zip(range(10**6), trainer.lora.parameters_list())][1::2]
    assert any(u.abs().sum() > 0 for u in up), "LoRA B matrices should have moved"
    assert not any(m._forward_hooks for m in den.dm.modules())


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_klein_gradients_equal_with_and_without_checkpointing(comfy_lib, built_in_inference_mode):
    """Checkpointed blocks recompute FLUX.2's in-place updates (the blocks add into their own inputs);
    their LoRA gradients must match. Also for weights made under inference mode, as every loader node
    makes them (there the recomputation used to fail on the mutated inputs)."""
    import contextlib

    import comfy.model_management as mm

    from dopsd_core.hosts.comfy import ComfyDenoiser, make_weights_trainable
    from dopsd_core.objectives import Batch, dopsd_backward
    grads = {}
    for ckpt in (False, True):
        with torch.inference_mode() if built_in_inference_mode else contextlib.nullcontext():
            mp = tiny_klein()
        den = ComfyDenoiser(mp)
        latent = torch.randn(128, 4, 4, generator=torch.Generator().manual_seed(1))
        text = torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode(False):
            make_weights_trainable(den.dm)
            was, mm.in_training = mm.in_training, True
            try:
                lora = den.add_lora(4, 4.0, seed=0)
                with torch.no_grad():
                    for p in lora.parameters_list():
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
                den.set_checkpointing(ckpt)
                batch = Batch(latent[None], den.context(text, {}, latent),
                              den.context(text, {"reference_latents": [latent[None]]}, latent))
                dopsd_backward(den, batch, den.sigma_grid(2, tuple(latent.shape)), torch.Generator().manual_seed(4),
                               teacher="frozen")
                grads[ckpt] = [p.grad.clone() for p in lora.parameters_list()]
            finally:
                mm.in_training = was
                den.release()
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # recomputation rounding only
    assert any(g.abs().sum() > 0 for g in grads[False])


def test_klein_dataset_build_uses_suffix_and_reference_latent(comfy_lib):
    from dopsd_core.data import ImageItem
    from dopsd_core.hosts.comfy_train import build_dataset
    from dopsd_core.hosts.families import Flux2KleinFamily
    mp = tiny_klein()
    seen = []

    def encode_text(caption):  # stands in for the Qwen3 CLIP: deterministic per caption
        seen.append(caption)
        g = torch.Generator().manual_seed(len(caption))
        return torch.randn(1, 8, 96, generator=g), {}

    class IdentityVae:  # latents of the right klein shape [128, h, w] from an image [1, H, W, 3]
        def encode(self, pixels):
            return pixels.mean(-1, keepdim=True).permute(0, 3, 1, 2)[:, :, ::16, ::16].repeat(1, 128, 1, 1)

    items = [ImageItem("a", torch.rand(3, 64, 64), ["a photo of [V]", "[V] on a table"])]
    ds = build_dataset(mp, items, encode_text, Flux2KleinFamily().teacher_context(encode_text), vae=IdentityVae())
    assert ds.family == "flux2-klein" and len(ds.records) == 1
    rec = ds.records[0]
    assert rec.x0.shape == (128, 4, 4) and len(rec.student_ctx) == len(rec.teacher_ctx) == 2
    assert any(c.endswith("consistent with the reference image.") and c.startswith("a photo of [V]") for c in seen)
    assert "ref_latents" in rec.teacher_ctx[0].kwargs and "ref_latents" not in rec.student_ctx[0].kwargs
    assert not rec.x0.is_inference() and not rec.teacher_ctx[0].kwargs["c_crossattn"].is_inference()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_klein_trains_the_same_when_comfyui_offloads_blocks(comfy_lib, tmp_path, monkeypatch, checkpointing):
    """offload=True asks ComfyUI's own loader for a partial load (memory_required=1e20, no full load, as
    its Train LoRA node does). A CPU device never partially loads, so here load_models_gpu answers the way
    it does on a GPU that is short of memory: ModelPatcher.load with room for a third of the weights.
    The other modules then run through comfy.ops' per-forward weight cast (comfy_cast_weights); the LoRA
    hooks and checkpointing on top must give the same losses and LoRA as a full load."""
    import comfy.model_management as mm

    from dopsd_core.hosts.comfy import ComfyDenoiser
    from dopsd_core.hosts.comfy_train import ComfyDataset, train
    from dopsd_core.denoiser import Record
    from dopsd_core.trainer import Callbacks, TrainConfig

    real_load, calls, cast_modules = mm.load_models_gpu, [], []

    def short_gpu(models, memory_required=0, force_full_load=False, **kw):
        calls.append((memory_required, force_full_load))
        if force_full_load:
            return real_load(models, memory_required=memory_required, force_full_load=True, **kw)
        for m in models:
            m.load(m.load_device, lowvram_model_memory=m.model_size() // 3, full_load=False)
    monkeypatch.setattr(mm, "load_models_gpu", short_gpu)

    def run(offload: bool):
        mp = tiny_klein()
        den = ComfyDenoiser(mp)
        gen = torch.Generator().manual_seed(3)
        latent, text = torch.randn(128, 4, 4, generator=gen), torch.randn(1, 8, 96, generator=gen)
        records = [Record("a", latent, ["c"], [den.context(text, {}, latent)],
                          [den.context(text, {"reference_latents": [latent[None]]}, latent)])]
        dm = mp.model.diffusion_model
        on_step = lambda info: cast_modules.append(sum(getattr(m, "comfy_cast_weights", False) for m in dm.modules()))
        cfg = TrainConfig(steps=3, rank=4, alpha=4.0, lr=1e-2, k=2, teacher="frozen", checkpointing=checkpointing,
                          save_every=0)
        _, lora_sd, history = train(mp, ComfyDataset("flux2-klein", records), cfg, tmp_path / f"run_{offload}",
                                    Callbacks(on_step=on_step), offload=offload)
        return lora_sd, history
    full_lora, full_hist = run(False)
    assert calls == [(0, True)] and cast_modules == [0, 0, 0]
    off_lora, off_hist = run(True)
    assert calls[1] == (1e20, False)
    assert min(cast_modules[3:]) > 0, "ComfyUI should have left some modules to the per-forward cast"
    assert off_hist == pytest.approx(full_hist, rel=1e-5, abs=1e-7)
    assert full_lora.keys() == off_lora.keys()
    assert max((full_lora[k] - off_lora[k]).abs().max().item() for k in full_lora) < 1e-5

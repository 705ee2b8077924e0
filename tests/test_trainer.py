"""Trainer: exact resume, refusals, NaN guard, determinism, warm start, optimizers, schedule."""
import json
import math
import sys

import pytest
import torch

from dopsd_core.errors import DopsdError, NonFiniteLoss, TrainingCancelled
from dopsd_core.lora import read_lora_file
from dopsd_core.optim import build_optimizer, lr_at
from dopsd_core.trainer import Callbacks, TrainConfig, Trainer

from testutil import lora_tensors, records_for, write_image_folder

CFG = dict(method="dopsd", rank=4, alpha=4.0, lr=2e-3, batch_size=2, k=4, teacher="ema", ema_decay=0.9,
           schedule="cosine", warmup=3, seed=0)


def test_exact_resume_matches_uninterrupted_run(tiny_records, tmp_path):
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=20, **CFG), tmp_path / "straight").run()
    straight = lora_tensors(den)

    den2, records2 = tiny_records()
    stop = Callbacks(should_stop=lambda: trainer.step >= 10)
    trainer = Trainer(den2, records2, TrainConfig(steps=20, save_every=10, **CFG), tmp_path / "resumed", stop)
    with pytest.raises(TrainingCancelled) as info:
        trainer.run()
    assert info.value.last_saved_step == 10
    assert json.loads((tmp_path / "resumed/state/state.json").read_text())["step"] == 10

    den3, records3 = tiny_records()
    resumed = Trainer(den3, records3, TrainConfig(steps=20, save_every=10, **CFG), tmp_path / "resumed", resume=True)
    assert resumed.step == 10
    resumed.run()
    after = lora_tensors(den3)
    assert straight.keys() == after.keys()
    worst = max((straight[k] - after[k]).abs().max().item() for k in straight)
    assert worst <= 1e-6, worst
    assert any(straight[k].abs().sum() > 0 for k in straight if ".lora_up." in k)
    hist = json.loads((tmp_path / "resumed/state/state.json").read_text())["history"]
    assert len(hist) == 20


def test_resume_allows_more_steps_and_refuses_everything_else(tiny_records, tmp_path, image_folder):
    den, records = tiny_records()
    run = tmp_path / "run"
    Trainer(den, records, TrainConfig(steps=3, **CFG), run).run()
    den, records = tiny_records()
    t = Trainer(den, records, TrainConfig(steps=5, **CFG), run, resume=True)
    assert t.run().steps_done == 5
    with pytest.raises(DopsdError, match="already at step 5"):
        Trainer(*tiny_records(), TrainConfig(steps=5, **CFG), run, resume=True)
    with pytest.raises(DopsdError, match="rank=4"):
        Trainer(*tiny_records(), TrainConfig(steps=9, **{**CFG, "rank": 8}), run, resume=True)
    with pytest.raises(DopsdError, match="lr="):
        Trainer(*tiny_records(), TrainConfig(steps=9, **{**CFG, "lr": 1e-4}), run, resume=True)
    with pytest.raises(DopsdError, match="trained on model"):
        Trainer(*tiny_records(seed=1), TrainConfig(steps=9, **CFG), run, resume=True)
    other = records_for(den, write_image_folder(tmp_path / "other", n=2))
    with pytest.raises(DopsdError, match="other data"):
        Trainer(tiny_records()[0], other, TrainConfig(steps=9, **CFG), run, resume=True)
    with pytest.raises(DopsdError, match="not a run folder"):
        Trainer(*tiny_records(), TrainConfig(steps=9, **CFG), tmp_path / "nothing", resume=True)
    with pytest.raises(DopsdError, match="already holds a run"):
        Trainer(*tiny_records(), TrainConfig(steps=9, **CFG), run)


def test_interrupted_save_is_detected(tiny_records, tmp_path):
    den, records = tiny_records()
    run = tmp_path / "run"
    Trainer(den, records, TrainConfig(steps=2, **CFG), run).run()
    state = json.loads((run / "state/state.json").read_text())
    state["step"] = 1  # as if state.json were from an earlier save than the tensors
    (run / "state/state.json").write_text(json.dumps(state))
    with pytest.raises(DopsdError, match="interrupted during a save"):
        Trainer(*tiny_records(), TrainConfig(steps=4, **CFG), run, resume=True)


def test_base_weights_bit_identical_after_training(tiny_records, tmp_path):
    den, records = tiny_records()
    before = {k: v.clone() for k, v in {**den.dit.state_dict(), **den.text_encoder.state_dict()}.items()}
    Trainer(den, records, TrainConfig(steps=4, **CFG), tmp_path / "r").run()
    after = {**den.dit.state_dict(), **den.text_encoder.state_dict()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class NanAfter:
    """Wraps a denoiser so that denoise returns NaN once `calls` forwards have run."""

    def __init__(self, den, calls):
        self.den, self.calls = den, calls

    def __getattr__(self, name):
        return getattr(self.den, name)

    def denoise(self, x, s, ctx):
        self.calls -= 1
        out = self.den.denoise(x, s, ctx)
        return out * float("nan") if self.calls < 0 else out


def test_nan_stops_and_keeps_last_good_run_folder(tiny_records, tmp_path):
    den, records = tiny_records()
    per_step = 2 * 4  # teacher + student forward per state, K = 4
    wrapped = NanAfter(den, calls=2 * per_step)  # steps 1, 2 are fine, step 3 is NaN
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as info:
        Trainer(wrapped, records, TrainConfig(steps=10, save_every=2, **CFG), run).run()
    assert info.value.step == 3 and info.value.last_saved_step == 2
    assert "step 3" in str(info.value) and "keeps step 2" in str(info.value)
    assert json.loads((run / "state/state.json").read_text())["step"] == 2
    sd, meta = read_lora_file(run / "lora.safetensors")
    assert meta["dopsd.step"] == "2" and all(torch.isfinite(v).all() for v in sd.values())


def test_seeded_determinism(tiny_records, tmp_path):
    results = []
    for i, seed in enumerate((0, 0, 1)):
        den, records = tiny_records()
        Trainer(den, records, TrainConfig(steps=3, **{**CFG, "seed": seed}), tmp_path / f"r{i}").run()
        results.append(lora_tensors(den))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_init_lora_warm_start(tiny_records, tmp_path):
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=3, **CFG), tmp_path / "first").run()
    first, _ = read_lora_file(tmp_path / "first/lora.safetensors")
    den2, records2 = tiny_records()
    t = Trainer(den2, records2, TrainConfig(steps=2, **CFG), tmp_path / "second",
                init_lora=tmp_path / "first/lora.safetensors")
    assert t.step == 0  # a new run: fresh optimizer and step count
    for which in ("student", "teacher"):
        sd = t.lora.state_dict_comfy(which)
        assert all(torch.equal(sd[k], first[k]) for k in first), which
    t.run()
    meta = read_lora_file(tmp_path / "second/lora.safetensors")[1]
    assert meta["dopsd.init_lora"].endswith("first/lora.safetensors")


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, "constant") == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, "constant") == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, 10, "constant") == 1.0
    assert lr_at(10, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 10, "cosine") < 0.01
    with pytest.raises(DopsdError):
        lr_at(0, 10, 1.0, 0, "linear")


def test_adamw8bit_trains_and_resumes_exactly(tiny_records, tmp_path):
    cfg = {**CFG, "optimizer": "adamw8bit"}
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=6, **cfg), tmp_path / "a").run()
    straight = lora_tensors(den)
    den2, records2 = tiny_records()
    trainer = Trainer(den2, records2, TrainConfig(steps=6, save_every=3, **cfg), tmp_path / "b",
                      Callbacks(should_stop=lambda: trainer.step >= 3))
    with pytest.raises(TrainingCancelled):
        trainer.run()
    opt_sd, _ = read_lora_file(tmp_path / "b/state/optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in opt_sd.values()), "8-bit optimizer states expected"
    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(steps=6, save_every=3, **cfg), tmp_path / "b", resume=True).run()
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(DopsdError, match="bitsandbytes"):
        build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    with pytest.raises(DopsdError, match="unknown optimizer"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_grad_accumulation_loss_is_mean_of_micro_batches(tiny_records, tmp_path):
    den, records = tiny_records()
    t = Trainer(den, records, TrainConfig(steps=2, **{**CFG, "grad_accum": 3}), tmp_path / "acc")
    micro = []
    original = t._micro_step

    def spy(batch, scale):
        assert scale == pytest.approx(1 / 3)
        micro.append(original(batch, scale))
        return micro[-1]
    t._micro_step = spy
    loss = t.train_step()
    assert len(micro) == 3 and loss == pytest.approx(sum(micro) / 3)


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_training_lowers_its_loss(tiny_records, tmp_path, method):
    """The objective, measured on fixed draws (noise, sigmas) over the whole dataset, falls."""
    from dopsd_core.objectives import Batch, dopsd_backward, sft_backward

    den, records = tiny_records()
    lr = 3e-3 if method == "dopsd" else 1e-2  # SFT fits data velocities: a slower, noisier target
    cfg = TrainConfig(steps=40, **{**CFG, "method": method, "lr": lr, "schedule": "constant", "warmup": 0,
                                   "teacher": "frozen", "batch_size": 3})
    trainer = Trainer(den, records, cfg, tmp_path / method)
    batch = Batch(torch.stack([r.x0 for r in records]), den.batch_contexts([r.student_ctx[0] for r in records]),
                  den.batch_contexts([r.teacher_ctx[0] for r in records]))

    def measured():
        losses = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            out = (dopsd_backward(den, batch, den.sigma_grid(4), g, teacher="frozen") if method == "dopsd"
                   else sft_backward(den, batch, den.shift, g))
            losses.append(out["loss"])
        trainer.opt.zero_grad(set_to_none=True)
        return sum(losses) / len(losses)
    before = measured()
    hist = trainer.run().history
    after = measured()
    assert all(math.isfinite(v) for v in hist)
    assert after < before * (0.9 if method == "dopsd" else 0.97), (before, after)


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank"), (dict(k=0), "--k"), (dict(lr=0.0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(steps=0), "--steps"), (dict(optimizer="sgd"), "optimizer"), (dict(teacher="live"), "teacher"),
    (dict(loss_weight="l1"), "loss weight"), (dict(states="two"), "states"), (dict(ema_decay=1.0), "EMA"),
])
def test_config_validation(bad, match):
    with pytest.raises(DopsdError, match=match):
        TrainConfig(**{**dict(steps=10), **bad}).validate()


def test_previews_and_callbacks(tiny_records, tmp_path):
    den, records = tiny_records()
    infos, previews = [], []
    cfg = TrainConfig(steps=4, preview_every=2, **CFG)
    Trainer(den, records, cfg, tmp_path / "p", Callbacks(on_step=infos.append,
                                                          on_preview=lambda s, im, p: previews.append((s, im))),
            preview_prompts=["a [V]", "a red [V]"]).run()
    assert [i.step for i in infos] == [1, 2, 3, 4] and all(i.total == 4 for i in infos)
    assert all(i.it_per_s > 0 and i.eta_s >= 0 and i.lr > 0 for i in infos)
    assert [s for s, _ in previews] == [2, 4]
    assert previews[0][1].shape == (2, 32, 32, 3) and 0 <= previews[0][1].min() and previews[0][1].max() <= 1


def test_aspect_buckets_batch_one_latent_size(tiny_records, tmp_path):
    """Records of two latent sizes: every batch shares one size, and a size is drawn about as often
    as it has records (here 1 of 3 vs 2 of 3)."""
    den, records = tiny_records()
    records[1].x0 = records[1].x0[:, :16, :16]
    t = Trainer(den, records, TrainConfig(steps=5, **{**CFG, "batch_size": 3}), tmp_path / "mixed")
    sizes = []
    for _ in range(300):
        batch = t._draw_batch()
        assert batch.x0.shape[0] == 3
        sizes.append(tuple(batch.x0.shape[-2:]))
    small = sizes.count((16, 16)) / len(sizes)
    assert set(sizes) == {(16, 16), (32, 32)} and 0.2 < small < 0.47


def test_one_size_draws_are_unchanged_by_bucketing(tiny_records, tmp_path):
    """With a single latent size the draw is the plain uniform one (runs before buckets reproduce)."""
    den, records = tiny_records()
    t = Trainer(den, records, TrainConfig(steps=5, **{**CFG, "batch_size": 3}), tmp_path / "one")
    gen = torch.Generator().manual_seed(t.cfg.seed)
    want = torch.randint(len(records), (3,), generator=gen).tolist()
    batch = t._draw_batch()
    assert torch.equal(batch.x0, torch.stack([records[i].x0 for i in want]))

"""Trainer: exact resume, refusals, NaN guard, determinism, warm start, aspect buckets, previews."""
import json
import math

import pytest
import torch

from dopsd_core.errors import DopsdError, NonFiniteLoss, TrainingCancelled
from dopsd_core.lora import read_lora_file
from dopsd_core.trainer import Callbacks, TrainConfig, Trainer

from testutil import CFG, lora_tensors, records_for, write_image_folder


def test_stop_between_saves_keeps_the_step_and_resume_matches_uninterrupted_run(tiny_records, tmp_path):
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=20, **CFG), tmp_path / "straight").run()
    straight = lora_tensors(den)

    den2, records2 = tiny_records()  # saves at 5, 10, ...; the stop comes at 7, between two of them
    stop = Callbacks(should_stop=lambda: trainer.step >= 7)
    trainer = Trainer(den2, records2, TrainConfig(steps=20, save_every=5, **CFG), tmp_path / "resumed", stop)
    with pytest.raises(TrainingCancelled) as info:
        trainer.run()
    assert info.value.step == info.value.last_saved_step == 7
    assert json.loads((tmp_path / "resumed/state/state.json").read_text())["step"] == 7
    assert sorted(p.name for p in (tmp_path / "resumed/state").glob("step-*")) == ["step-000007"]  # older removed

    den3, records3 = tiny_records()
    resumed = Trainer(den3, records3, TrainConfig(steps=20, save_every=5, **CFG), tmp_path / "resumed", resume=True)
    assert resumed.step == 7
    resumed.run()
    after = lora_tensors(den3)
    assert straight.keys() == after.keys()
    worst = max((straight[k] - after[k]).abs().max().item() for k in straight)
    assert worst <= 1e-6, worst
    assert any(straight[k].abs().sum() > 0 for k in straight if ".lora_up." in k)
    hist = json.loads((tmp_path / "resumed/state/state.json").read_text())["history"]
    assert len(hist) == 20


class Cancelled(Exception):
    """Stands in for ComfyUI's InterruptProcessingException, which its progress hook raises from on_step."""


@pytest.mark.parametrize("where", ["on_step", "on_preview"])
def test_a_stop_raised_by_a_callback_saves_that_step_first(tiny_records, tmp_path, where):
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=6, **CFG), tmp_path / "straight").run()
    straight = lora_tensors(den)

    def cancel_at_3(*args):
        if trainer.step == 3:
            raise Cancelled()
    den2, records2 = tiny_records()
    cb = Callbacks(**{where: cancel_at_3})
    trainer = Trainer(den2, records2, TrainConfig(steps=6, preview_every=1, **CFG), tmp_path / "run", cb,
                      preview_fn=lambda: torch.zeros(1))
    with pytest.raises(Cancelled):
        trainer.run()
    state = json.loads((tmp_path / "run/state/state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3
    assert read_lora_file(tmp_path / "run/lora.safetensors")[1]["dopsd.step"] == "3"
    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(steps=6, preview_every=1, **CFG), tmp_path / "run", resume=True).run()
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6


class InForward:
    """Makes the n-th denoise call of the run raise `exc`: in its forward, or in its backward (a gradient
    hook on the output, where a checkpointed block recomputes). Counts the calls of the first step too."""

    def __init__(self, den, exc, at: int | None = None, where: str = "forward"):
        self.inner, self.exc, self.at, self.where, self.calls = den.denoise, exc, at, where, 0

    def __call__(self, x, sigma, ctx):
        self.calls += 1
        fire = self.calls == self.at
        if fire and self.where == "forward":
            raise self.exc()
        out = self.inner(x, sigma, ctx)
        if fire and out.requires_grad:
            def hook(_grad):
                raise self.exc()
            out.register_hook(hook)
        elif fire:  # a no-grad (teacher) call: its backward never runs; fire at the next one instead
            self.at += 1
        return out


@pytest.mark.parametrize("exc,where", [(Cancelled, "forward"), (KeyboardInterrupt, "forward"),
                                       (RuntimeError, "forward"), (Cancelled, "backward")])
def test_a_stop_inside_a_step_keeps_the_step_before_it_and_resume_matches(tiny_records, tmp_path, exc, where):
    """ComfyUI's Cancel raises from the next op of a forward; Ctrl-C or an error can come anywhere. The
    partial step is dropped (no gradients left, the RNG stream back where it began), the last complete
    step is saved, and a resume ends where an uninterrupted run ends."""
    cfg = dict(steps=6, prior_weight=0.5, **CFG)
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(**cfg), tmp_path / "straight", prior=_prior(den, ["a cat", "a [V]"])).run()
    straight = lora_tensors(den)
    straight_state = json.loads((tmp_path / "straight/state/state.json").read_text())

    den2, records2 = tiny_records()
    counter = InForward(den2, exc)
    den2.denoise = counter
    trainer = Trainer(den2, records2, TrainConfig(**cfg), tmp_path / "run", prior=_prior(den2, ["a cat", "a [V]"]))
    trainer.train_step()
    per_step = counter.calls  # teacher + student calls of one step, prior roll-outs included
    assert per_step >= 8
    counter.at = 2 * per_step + per_step // 2  # the middle of step 3
    rng_at_step_3 = []
    trainer.cb.on_step = lambda info: rng_at_step_3.append(trainer.gen.get_state()) if info.step == 2 else None
    with pytest.raises(exc):
        trainer.run()
    assert trainer.step == 2 and len(trainer.history) == 2
    assert all(p.grad is None for p in trainer.params)  # the partial step's gradients are gone
    assert torch.equal(trainer.gen.get_state(), rng_at_step_3[0])
    state = json.loads((tmp_path / "run/state/state.json").read_text())
    assert state["step"] == 2 and state["history"] == pytest.approx(straight_state["history"][:2], abs=1e-6)
    assert read_lora_file(tmp_path / "run/lora.safetensors")[1]["dopsd.step"] == "2"

    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(**cfg), tmp_path / "run", prior=_prior(den3, ["a cat", "a [V]"]),
            resume=True).run()
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6
    final = json.loads((tmp_path / "run/state/state.json").read_text())
    assert final["history"] == pytest.approx(straight_state["history"], abs=1e-6)


def test_a_non_finite_loss_inside_a_step_still_stops_at_the_last_good_save(tiny_records, tmp_path):
    """The rule for NaN is unchanged by the stop handling: nothing after the last save is written."""
    den, records = tiny_records()
    wrapped = NanAfter(den, calls=7 * 2 * 4)  # steps 1-7 fine, step 8 NaN; saves at 5 only
    trainer = Trainer(wrapped, records, TrainConfig(steps=20, save_every=5, **CFG), tmp_path / "run")
    with pytest.raises(NonFiniteLoss) as info:
        trainer.run()
    assert info.value.step == 8 and info.value.last_saved_step == 5
    assert json.loads((tmp_path / "run/state/state.json").read_text())["step"] == 5
    assert all(p.grad is None for p in trainer.params)


class Killed(BaseException):
    """A process killed at this point: nothing after it runs, no cleanup (BaseException: no except catches it)."""


@pytest.mark.parametrize("fault_at", range(8))
def test_a_kill_at_any_write_of_a_save_leaves_a_complete_generation(tiny_records, tmp_path, monkeypatch, fault_at):
    """Saves at step 2, then at step 4 a kill before the fault_at-th file operation of that save (tensor
    files, the commit, the user's LoRA names, the cleanup, the loss files): the folder must resume, from
    step 2 or step 4, and end where an uninterrupted run ends."""
    import dopsd_core.run_folder as run_folder_mod
    import dopsd_core.trainer as trainer_mod
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=6, **CFG), tmp_path / "straight").run()
    straight = lora_tensors(den)

    den2, records2 = tiny_records()
    run = tmp_path / "run"
    trainer = Trainer(den2, records2, TrainConfig(steps=6, save_every=2, **CFG), run)
    ops = []

    def counted(name, real):
        def op(*args, **kwargs):
            if trainer.step == 4:
                ops.append(name)
                if len(ops) - 1 == fault_at:
                    raise Killed(name)
            return real(*args, **kwargs)
        return op
    monkeypatch.setattr(run_folder_mod, "save_tensors", counted("save_tensors", run_folder_mod.save_tensors))
    monkeypatch.setattr(run_folder_mod, "save_json", counted("save_json", run_folder_mod.save_json))
    monkeypatch.setattr(run_folder_mod.shutil, "rmtree", counted("rmtree", run_folder_mod.shutil.rmtree))
    monkeypatch.setattr(trainer_mod, "write_loss_files", counted("write_loss_files", trainer_mod.write_loss_files))
    monkeypatch.setattr(run_folder_mod, "link_file", counted("link_file", run_folder_mod.link_file))
    with pytest.raises(Killed):
        trainer.run()
    monkeypatch.undo()

    den3, records3 = tiny_records()
    resumed = Trainer(den3, records3, TrainConfig(steps=6, save_every=2, **CFG), run, resume=True)
    committed = fault_at > ops.index("save_json") if "save_json" in ops else False
    assert resumed.step == (4 if committed else 2), ops
    resumed.run()
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6


def test_a_stale_generation_of_a_killed_save_is_replaced(tiny_records, tmp_path):
    den, records = tiny_records()
    run = tmp_path / "run"
    Trainer(den, records, TrainConfig(steps=2, **CFG), run).run()
    (run / "state/step-000004").mkdir()
    (run / "state/step-000004/teacher.safetensors").write_bytes(b"half a file")
    t = Trainer(*tiny_records(), TrainConfig(steps=4, **CFG), run, resume=True)
    t.run()
    assert sorted(p.name for p in (run / "state").glob("step-*")) == ["step-000004"]
    Trainer(*tiny_records(), TrainConfig(steps=5, **CFG), run, resume=True)  # loads the new step 4


def test_resume_allows_more_steps_and_refuses_everything_else(tiny_records, tmp_path, image_folder):
    den, records = tiny_records()
    run = tmp_path / "run"
    Trainer(den, records, TrainConfig(steps=3, **CFG), run).run()
    den, records = tiny_records()
    t = Trainer(den, records, TrainConfig(steps=5, **CFG), run, resume=True)
    assert t.run().steps_done == 5
    saved = lora_tensors(den)
    den, records = tiny_records()
    same = Trainer(den, records, TrainConfig(steps=5, **CFG), run, resume=True)  # steps == saved: the LoRA as saved
    assert same.run().steps_done == 5 and len(same.history) == 5
    assert all(torch.equal(saved[k], v) for k, v in lora_tensors(den).items())
    with pytest.raises(DopsdError, match="already at step 5"):
        Trainer(*tiny_records(), TrainConfig(steps=4, **CFG), run, resume=True)
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
    (dict(loss_weight="l1"), "loss weight"), (dict(states="three"), "states"), (dict(ema_decay=1.0), "EMA"),
    (dict(prior_every=0), "--prior-every"), (dict(prior_states="some"), "--prior-states"),
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
    assert [s for s, _ in previews] == [0, 2, 4]  # step 0: the starting model, on the same fixed noise
    assert previews[0][1].shape == (2, 32, 32, 3) and 0 <= previews[0][1].min() and previews[0][1].max() <= 1
    with torch.no_grad():  # the starting model's samples are the base's: the LoRA starts at dW = 0
        den.lora().detach()
        base = Trainer.preview(type("T", (), {"den": den, "preview_prompts": ["a [V]", "a red [V]"],
                                               "lora": den.add_lora(4, 4.0), "cfg": cfg, "records": records})())
    torch.testing.assert_close(previews[0][1], base, rtol=0, atol=0)
    assert (previews[2][1] - previews[0][1]).abs().max() > 0
    # a resumed run does not draw its start again
    more = []
    Trainer(den, records, TrainConfig(steps=6, preview_every=2, **CFG), tmp_path / "p",
            Callbacks(on_preview=lambda s, im, p: more.append(s)), preview_prompts=["a [V]"], resume=True).run()
    assert more == [6]


def test_aspect_buckets_batch_one_latent_size(tiny_records, tmp_path):
    """Records of two latent sizes: every batch shares one size, and a size is drawn about as often
    as it has records (here 1 of 3 vs 2 of 3)."""
    den, records = tiny_records()
    records[1].x0 = records[1].x0[:, :16, :16]
    t = Trainer(den, records, TrainConfig(steps=5, **{**CFG, "batch_size": 3}), tmp_path / "mixed")
    sizes = []
    for _ in range(300):
        batch = t.draw_batch()
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
    batch = t.draw_batch()
    assert torch.equal(batch.x0, torch.stack([records[i].x0 for i in want]))


def test_each_batch_rolls_out_on_the_grid_of_its_latent_size(tiny_records, tmp_path, monkeypatch):
    """Aspect buckets: a resolution-aware schedule (klein's) gives each latent size its own grid, and a
    batch (one bucket) must be rolled out on its own size's grid, not the first image's."""
    import dopsd_core.trainer as trainer_mod
    from dopsd_core.denoiser import Record
    den, records = tiny_records()

    class SizeAwareGrid:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def sigma_grid(self, steps, latent_shape):
            return [1.0, latent_shape[-1] / 100, 0.0]
    small = [Record(f"small{i}", r.x0[:, :16, :24].clone(), r.captions, r.student_ctx, r.teacher_ctx)
             for i, r in enumerate(records)]
    seen = []

    def fake_backward(_den, batch, sigmas, *args, **kwargs):
        seen.append((tuple(batch.x0.shape[1:]), list(sigmas)))
        return {"loss": 1.0}
    monkeypatch.setattr(trainer_mod, "dopsd_backward", fake_backward)
    Trainer(SizeAwareGrid(den), records + small, TrainConfig(steps=12, **CFG), tmp_path / "run").run()
    assert {shape for shape, _ in seen} == {tuple(records[0].x0.shape), (records[0].x0.shape[0], 16, 24)}
    assert all(sigmas == [1.0, shape[-1] / 100, 0.0] for shape, sigmas in seen)


def _prior(den, prompts):
    from dopsd_core.prior import Prior
    return Prior(list(prompts), [den.encode_prompt(p) for p in prompts])


PRIOR_PROMPTS = ["a red on a black background", "a green on a black background", "", "a blue [V5]"]


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_the_prior_term_is_zero_while_the_student_is_its_starting_model(tiny_records, tmp_path, method):
    """The prior's teacher is the model the run started from: at the first step (LoRA B = 0) it adds
    nothing for D-OPSD; SFT's prior is flow matching on class images, which has a loss of its own."""
    den, records = tiny_records()
    t = Trainer(den, records, TrainConfig(steps=1, **{**CFG, "method": method, "prior_weight": 1.0}), tmp_path / "a",
                prior=_prior(den, PRIOR_PROMPTS))
    with_prior = t.run().history[0]
    den2, records2 = tiny_records()
    without = Trainer(den2, records2, TrainConfig(steps=1, **{**CFG, "method": method}), tmp_path / "b").run().history[0]
    if method == "dopsd":
        assert with_prior == pytest.approx(without, rel=1e-6)
    else:
        assert with_prior > without * 1.01  # the class images' flow-matching loss is added


def _drift_on(den, prompts, seed=5):
    """Mean |x0| difference between the trained student and the base on 4-step samples of prompts."""
    from dopsd_core.denoiser import sample
    ctx = den.batch_contexts([den.encode_prompt(p) for p in prompts])
    shape = (len(prompts), *den.latent_shape)
    outs = []
    for mode in ("student", "off"):
        with den.lora().use(mode):
            outs.append(sample(den, ctx, shape, den.sigma_grid(4), torch.Generator().manual_seed(seed)))
    return (outs[0] - outs[1]).abs().mean().item()


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_the_prior_keeps_the_student_closer_to_the_base_on_prior_prompts(tiny_records, tmp_path, method):
    cfg = {**CFG, "method": method, "lr": 2e-2, "schedule": "constant", "warmup": 0}
    drift = {}
    for weight in (0.0, 3.0):
        den, records = tiny_records()
        Trainer(den, records, TrainConfig(steps=25, prior_weight=weight, prior_batch=2, **cfg),
                tmp_path / f"{weight}", prior=_prior(den, PRIOR_PROMPTS) if weight else None).run()
        drift[weight] = _drift_on(den, PRIOR_PROMPTS)
    assert drift[3.0] < 0.7 * drift[0.0], drift


def test_sft_class_images_are_made_once_and_resume_is_exact(tiny_records, tmp_path):
    from dopsd_core.trainer import PRIOR_CLASS_IMAGES
    cfg = {**CFG, "method": "sft", "prior_weight": 1.0}
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=6, **cfg), tmp_path / "straight", prior=_prior(den, PRIOR_PROMPTS)).run()
    straight = lora_tensors(den)
    cls = tmp_path / "straight/prior/class_latents.safetensors"
    from dopsd_core.fileio import load_tensors
    latents, meta = load_tensors(cls)
    assert latents["latents"].shape == (PRIOR_CLASS_IMAGES, *records[0].x0.shape)
    assert json.loads(meta["dopsd.prompts"]) == PRIOR_PROMPTS

    den2, records2 = tiny_records()
    trainer = Trainer(den2, records2, TrainConfig(steps=6, **cfg), tmp_path / "run", Callbacks(
        should_stop=lambda: trainer.step >= 3), prior=_prior(den2, PRIOR_PROMPTS))
    with pytest.raises(TrainingCancelled):
        trainer.run()
    made = (tmp_path / "run/prior/class_latents.safetensors").stat().st_mtime_ns
    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(steps=6, **cfg), tmp_path / "run", resume=True,
            prior=_prior(den3, PRIOR_PROMPTS)).run()
    assert (tmp_path / "run/prior/class_latents.safetensors").stat().st_mtime_ns == made  # reused
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6
    with pytest.raises(DopsdError, match="other data"):  # other prior prompts are other training data
        Trainer(*tiny_records(), TrainConfig(steps=9, **cfg), tmp_path / "run", resume=True,
                prior=_prior(den3, PRIOR_PROMPTS[:2]))


def test_a_warm_start_anchors_the_prior_on_the_loaded_lora_and_records_both_concepts(tiny_records, tmp_path):
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=4, **CFG), tmp_path / "first", trigger="[V]").run()
    first = tmp_path / "first/lora.safetensors"
    den2, records2 = tiny_records()
    t = Trainer(den2, records2, TrainConfig(steps=1, **{**CFG, "prior_weight": 1.0}), tmp_path / "second",
                init_lora=first, trigger="[V2]", prior=_prior(den2, PRIOR_PROMPTS))
    anchor, student = t.lora.state_dict_comfy("anchor"), t.lora.state_dict_comfy("student")
    assert all(torch.equal(anchor[k], student[k]) for k in anchor)
    assert any(v.abs().sum() > 0 for k, v in anchor.items() if ".lora_up." in k)  # the loaded LoRA, not B = 0
    t.run()
    meta = read_lora_file(tmp_path / "second/lora.safetensors")[1]
    assert [c["trigger"] for c in json.loads(meta["dopsd.concepts"])] == ["[V]", "[V2]"]
    # resuming the warm-started run restores its anchor from the run folder, not from B = 0
    den3, records3 = tiny_records()
    r = Trainer(den3, records3, TrainConfig(steps=2, **{**CFG, "prior_weight": 1.0}), tmp_path / "second",
                resume=True, prior=_prior(den3, PRIOR_PROMPTS))
    assert all(torch.equal(r.lora.state_dict_comfy("anchor")[k], anchor[k]) for k in anchor)


def test_prior_settings_are_validated(tiny_records, tmp_path):
    with pytest.raises(DopsdError, match="prior-weight"):
        TrainConfig(prior_weight=-1).validate()
    with pytest.raises(DopsdError, match="prior-batch"):
        TrainConfig(prior_batch=0).validate()
    with pytest.raises(DopsdError, match="needs prior prompts"):
        Trainer(*tiny_records(), TrainConfig(steps=2, **{**CFG, "prior_weight": 1.0}), tmp_path / "r")


def test_every_save_point_keeps_its_lora(tiny_records, tmp_path):
    den, records = tiny_records()
    run = tmp_path / "run"
    Trainer(den, records, TrainConfig(steps=6, save_every=2, **CFG), run).run()
    files = sorted(p.name for p in run.glob("lora-*.safetensors"))
    assert files == ["lora-000002.safetensors", "lora-000004.safetensors", "lora-000006.safetensors"]
    last, meta = read_lora_file(run / "lora-000006.safetensors")
    final, _ = read_lora_file(run / "lora.safetensors")
    assert meta["dopsd.step"] == "6" and all(torch.equal(last[k], final[k]) for k in final)
    early, meta2 = read_lora_file(run / "lora-000002.safetensors")
    assert meta2["dopsd.step"] == "2" and any(not torch.equal(early[k], final[k]) for k in final)


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_lokr_and_loha_resume_exactly_warm_start_and_checkpoint_like_lora(tiny_records, tmp_path, adapter):
    """A stop and resume equals the straight run; --init-lora from the file starts the next run (student and
    teacher) from it; checkpointing gives the same step; another adapter's file is refused."""
    cfg = dict(CFG, adapter=adapter, lokr_factor=4)
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=4, **cfg), tmp_path / "straight").run()
    straight = lora_tensors(den)
    den2, records2 = tiny_records()
    trainer = Trainer(den2, records2, TrainConfig(steps=4, **cfg), tmp_path / "stopped",
                      Callbacks(should_stop=lambda: trainer.step >= 2))
    with pytest.raises(TrainingCancelled):
        trainer.run()
    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(steps=4, **cfg), tmp_path / "stopped", resume=True).run()
    resumed = lora_tensors(den3)
    assert straight.keys() == resumed.keys() and not any(".lora_up." in k for k in straight)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    den4, records4 = tiny_records()
    Trainer(den4, records4, TrainConfig(steps=4, checkpointing=True, **cfg), tmp_path / "ckpt").run()
    ckpt = lora_tensors(den4)
    assert max((straight[k] - ckpt[k]).abs().max().item() for k in straight) <= 1e-5

    first = tmp_path / "straight" / "lora.safetensors"
    den5, records5 = tiny_records()
    warm = Trainer(den5, records5, TrainConfig(steps=1, **cfg), tmp_path / "warm", init_lora=first)
    sd, meta = read_lora_file(first)
    assert meta["dopsd.adapter"] == adapter
    assert all(torch.equal(warm.lora.state_dict_comfy("teacher")[k], sd[k]) for k in sd)
    den6, records6 = tiny_records()
    with pytest.raises(DopsdError, match=f"is a {adapter} file and this run trains lora"):
        Trainer(den6, records6, TrainConfig(steps=1, **CFG), tmp_path / "other", init_lora=first)


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_the_prior_every_kth_step_weighs_k_times_and_prior_states_choose_its_states(tiny_records, tmp_path,
                                                                                     monkeypatch, method):
    """prior_every 2: the prior term on steps 1, 3, 5 (0-based 0, 2, 4) at twice the weight, none between;
    prior_states one: D-OPSD's prior roll-outs supervise one state while the concept's supervise all."""
    import dopsd_core.trainer as trainer_mod
    from dopsd_core.prior import Prior
    calls = []
    real = {"dopsd": trainer_mod.dopsd_backward, "sft": trainer_mod.sft_backward}

    def spy(kind):
        def f(*args, **kwargs):
            calls.append((kind, kwargs.get("teacher"), kwargs.get("states"), kwargs["loss_scale"]))
            return real[kind](*args, **kwargs)
        return f
    monkeypatch.setattr(trainer_mod, "dopsd_backward", spy("dopsd"))
    monkeypatch.setattr(trainer_mod, "sft_backward", spy("sft"))
    den, records = tiny_records()
    prompts = ["a red circle on a black background", ""]
    prior = Prior(prompts, [den.encode_prompt(p) for p in prompts])
    infos = []
    cfg = TrainConfig(**{**CFG, "method": method, "steps": 5, "prior_weight": 0.25, "prior_every": 2,
                         "prior_states": "one", "grad_accum": 1})
    Trainer(den, records, cfg, tmp_path / "run", Callbacks(on_step=infos.append), prior=prior).run()
    assert [i.prior_loss is not None for i in infos] == [True, False, True, False, True]
    concept = [c for c in calls if c[3] == pytest.approx(1.0)]  # loss_scale 1 / grad_accum
    prior_calls = [c for c in calls if c[3] == pytest.approx(0.25 * 2)]  # prior_weight x prior_every
    assert len(concept) == 5 and len(prior_calls) == 3 and len(calls) == 8
    if method == "dopsd":
        assert all(c[1] == "start" and c[2] == "one" for c in prior_calls)
        assert all(c[1] != "start" and c[2] == cfg.states == "all" for c in concept)

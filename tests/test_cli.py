"""The `dopsd` command line, as a user runs it (subprocesses)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from dopsd_core.lora import read_lora_file
from dopsd_core.trainer import TrainConfig
from testutil import cli_in_process, needs_weights, run_cli, write_image_folder


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("dopsd: no trained toy")]
    assert len(lines) == 1 and lines[0].startswith("dopsd: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_train_resume_and_sample(tmp_path, image_folder):
    run = tmp_path / "run"
    rc, out, err = run_cli("train", "--method", "dopsd", "--model", "toy", "--data", image_folder, "--steps", "2",
                           "--save-every", "1", "--out", run, "--rank", "4", "--k", "2")
    assert rc == 0, err
    assert "2/2" in err and "ETA" in err  # progress bar with loss and ETA
    for f in ("lora.safetensors", "loss.csv", "loss.png", "state/step-000002/teacher.safetensors",
              "state/step-000002/optimizer.safetensors", "state/step-000002/lora.safetensors", "state/state.json"):
        assert (run / f).is_file(), f
    csv = (run / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss" and len(csv) == 3
    sd, meta = read_lora_file(run / "lora.safetensors")
    assert meta["dopsd.method"] == "dopsd" and meta["dopsd.model_family"] == "toy" and meta["dopsd.k"] == "2"
    assert json.loads(meta["dopsd.sigma_grid"]) == [1.0, 0.75, 0.0]
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)

    rc, out, err = run_cli("train", "--resume", run, "--steps", "3")
    assert rc == 0, err
    state = json.loads((run / "state/state.json").read_text())
    assert state["step"] == 3 and state["config"]["rank"] == 4 and len(state["history"]) == 3
    # flags left out took the toy's study-chosen defaults (toy/runs.py), not the library's generic ones
    from dopsd_core.toy.runs import TOY_BUDGET, TOY_PRIOR
    c = state["config"]
    assert (c["lr"], c["batch_size"], c["prior_batch"], c["prior_weight"]) == (
        TOY_BUDGET["lr"], TOY_BUDGET["batch_size"], TOY_PRIOR["prior_batch"], 1.0)
    assert c["lr"] != TrainConfig().lr and c["batch_size"] != TrainConfig().batch_size

    rc, out, err = run_cli("sample", "--model", "toy", "--lora", run / "lora.safetensors", "--prompt", "a red [V]",
                           "--steps", "4", "--n", "3", "--seed", "1", "--out", tmp_path / "samples")
    assert rc == 0, err
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size == (32, 32) for p in pngs)


@pytest.mark.parametrize("case", ["missing", "empty", "no_caption", "blank_caption", "undecodable"])
def test_bad_data_folders(tmp_path, case):
    data = tmp_path / "data"
    if case != "missing":
        write_image_folder(data, n=2) if case != "empty" else data.mkdir()
    if case == "no_caption":
        (data / "img1.txt").unlink()
    if case == "blank_caption":
        (data / "img1.txt").write_text("\n  \n")
    if case == "undecodable":
        (data / "img1.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    rc, _, err = cli_in_process("train", "--data", data, "--steps", "2", "--out", out)
    needle = {"missing": "does not exist", "empty": "has no images", "no_caption": "img1.png has no caption",
              "blank_caption": "img1.txt is blank", "undecodable": "img1.png cannot be decoded"}[case]
    assert_one_line_error(rc, err, needle)
    assert not (out / "lora.safetensors").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--rank", "0"], "--rank must be > 0"), (["--k", "0"], "--k must be >= 1"), (["--lr", "0"], "--lr must be"),
    (["--lr", "nan"], "--lr must be"), (["--steps", "0"], "--steps must be > 0"),
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
])
def test_bad_flags(tmp_path, image_folder, flags, needle):
    out = tmp_path / "out"
    rc, _, err = cli_in_process("train", "--data", image_folder, "--steps", "2", "--out", out, *flags)
    assert_one_line_error(rc, err, needle)
    assert not out.exists() or not (out / "lora.safetensors").exists()


def test_unusable_out_and_bad_resume(tmp_path, image_folder):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = cli_in_process("train", "--data", image_folder, "--steps", "2", "--out", a_file)
    assert_one_line_error(rc, err, "is a file")
    # named before any model is looked for: a full-size family would load for minutes first
    rc, _, err = cli_in_process("train", "--model", "flux2-klein", "--data", image_folder, "--out", a_file)
    assert_one_line_error(rc, err, "is a file")
    rc, _, err = cli_in_process("train", "--resume", tmp_path / "not_a_run")
    assert_one_line_error(rc, err, "is not a run folder")
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "1", "--out", run, "--rank", "4", "--k", "1")
    assert rc == 0, err
    lora_before = (run / "lora.safetensors").read_bytes()
    rc, _, err = cli_in_process("train", "--resume", run, "--steps", "3", "--rank", "8")
    assert_one_line_error(rc, err, "another training config", "rank=4")
    other_weights = tmp_path / "other.safetensors"
    from dopsd_core.toy.denoiser import random_toy, save_toy
    save_toy(random_toy(seed=5), other_weights)
    rc, _, err = cli_in_process("train", "--resume", run, "--steps", "3", "--weights", other_weights)
    assert_one_line_error(rc, err, "trained on model")
    rc, _, err = cli_in_process("train", "--data", image_folder, "--steps", "3", "--out", run)
    assert_one_line_error(rc, err, "already holds a run", "--resume")
    assert (run / "lora.safetensors").read_bytes() == lora_before  # nothing was overwritten


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_saves_keeps_that_step_and_resume_matches(tmp_path, image_folder, monkeypatch, signum):
    """In process, so that the signal arrives right after step 3 (deterministic); the real handler of
    `dopsd train` gets it. --save-every 0: nothing would be saved before the end without the stop."""
    from dopsd_core import cli
    from dopsd_core.trainer import Trainer
    args = ["train", "--data", str(image_folder), "--steps", "6", "--rank", "4", "--k", "2", "--seed", "3"]
    assert cli.main(args + ["--out", str(tmp_path / "straight")]) == 0

    real_step = Trainer.train_step

    def step_then_signal(self):
        loss = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    run = tmp_path / "run"
    before = signal.getsignal(signum)  # SIG_IGN where the tests run in a background job
    assert cli.main(args + ["--out", str(run)]) == 128 + signum
    monkeypatch.undo()
    assert signal.getsignal(signum) == before  # the CLI gave the process its handler back
    state = json.loads((run / "state/state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3
    assert read_lora_file(run / "lora.safetensors")[1]["dopsd.step"] == "3"

    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 0
    a, _ = read_lora_file(tmp_path / "straight/lora.safetensors")
    b, _ = read_lora_file(run / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_inside_a_forward_keeps_the_step_before_it_and_resume_matches(tmp_path, image_folder, monkeypatch,
                                                                                  capsys, exc):
    """`dopsd train` with an error raised from inside the toy's forward in the middle of step 3: the CLI
    names the step it kept (2), passes the error on, and --resume ends where an uninterrupted run ends."""
    from dopsd_core import cli
    from dopsd_core.toy.denoiser import ToyDenoiser
    args = ["train", "--data", str(image_folder), "--steps", "5", "--rank", "4", "--k", "2", "--seed", "3",
            "--teacher-check", "off"]  # every denoise call is a training step's
    real = ToyDenoiser.denoise
    calls = []

    def counting(self, *a, **kw):
        calls.append(1)
        if len(calls) == fire_at:
            raise exc("injected inside a forward")
        return real(self, *a, **kw)
    fire_at = -1
    monkeypatch.setattr(ToyDenoiser, "denoise", counting)
    assert cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert len(calls) % 5 == 0
    per_step, fire_at = len(calls) // 5, 2 * (len(calls) // 5) + len(calls) // 10 + 1
    calls.clear()
    run = tmp_path / "run"
    with pytest.raises(exc):
        cli.main(args + ["--out", str(run)])
    monkeypatch.undo()
    assert f"during step 3; {run} keeps step 2" in capsys.readouterr().err
    state = json.loads((run / "state/state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 2 and per_step > 2

    assert cli.main(["train", "--resume", str(run), "--steps", "5"]) == 0
    a, _ = read_lora_file(tmp_path / "straight/lora.safetensors")
    b, _ = read_lora_file(run / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_sigterm_to_a_real_process_saves_the_step_it_names(tmp_path, image_folder):
    """`dopsd train` as its own process, SIGTERM once it is training: it exits 143 and names the step it
    kept, and that step is what the run folder holds."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_core", "train", "--data", str(image_folder), "--steps",
                             "100000", "--rank", "4", "--k", "2", "--out", str(run)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not run.exists() and time.time() < deadline:  # the trainer made its folder: the model is loaded
        time.sleep(0.05)
    time.sleep(2)  # inside the training loop by now
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    stopped = int(re.search(r"stopped at step (\d+)", err).group(1))
    assert stopped >= 1 and json.loads((run / "state/state.json").read_text())["step"] == stopped


def test_sigkill_at_any_moment_leaves_a_resumable_run_folder(tmp_path, image_folder):
    """Saving every step, killed with SIGKILL (no handler runs) three times at different moments: each
    time the folder resumes from a complete save."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dopsd_core", "train", "--data", str(image_folder), "--steps", "100000",
           "--rank", "4", "--k", "2", "--save-every", "1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last = 0
    for delay in (1.5, 2.3, 3.1):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while not (run / "state/state.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = json.loads((run / "state/state.json").read_text())
        assert state["step"] >= last
        last = state["step"]
        cmd = [sys.executable, "-m", "dopsd_core", "train", "--resume", str(run), "--steps", "100000"]
    rc, _, err = run_cli("train", "--resume", run, "--steps", str(last + 1))
    assert rc == 0, err
    assert json.loads((run / "state/state.json").read_text())["step"] == last + 1


def test_prior_flags(tmp_path, image_folder):
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "2", "--rank", "4", "--k", "2", "--out", run,
                         "--prior-prompts", "auto", "--class-word", "shape", "--prior-batch", "2")
    assert rc == 0, err
    state = json.loads((run / "state/state.json").read_text())
    assert state["config"]["prior_weight"] == 1.0 and state["config"]["prior_batch"] == 2
    prior = state["prior_prompts"]
    assert prior[:3] == ["a red shape on a black background", "a shape", ""] and "a red circle" in prior
    meta = read_lora_file(run / "lora.safetensors")[1]
    assert json.loads(meta["dopsd.concepts"])[0]["trigger"] == "[V]" and meta["dopsd.prior_weight"] == "1.0"
    rc, _, err = run_cli("train", "--resume", run, "--steps", "3")  # the prior comes back from the run folder
    assert rc == 0, err
    assert json.loads((run / "state/state.json").read_text())["prior_prompts"] == prior

    prompts = tmp_path / "prior.txt"
    prompts.write_text("a blue circle\n<empty>\n")
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "1", "--rank", "4", "--k", "2",
                         "--out", tmp_path / "file", "--prior-prompts", prompts, "--prior-weight", "0.5")
    assert rc == 0, err
    assert json.loads((tmp_path / "file/state/state.json").read_text())["prior_prompts"] == ["a blue circle", ""]

    # the default of a new run is the auto prior at weight 1; `none` turns it off
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "1", "--rank", "4", "--k", "2",
                         "--out", tmp_path / "default")
    assert rc == 0, err
    state = json.loads((tmp_path / "default/state/state.json").read_text())
    assert state["config"]["prior_weight"] == 1.0 and state["prior_prompts"][:2] == ["a red on a black background", "a"]
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "1", "--rank", "4", "--k", "2",
                         "--out", tmp_path / "off", "--prior-prompts", "none")
    assert rc == 0, err
    state = json.loads((tmp_path / "off/state/state.json").read_text())
    assert state["config"]["prior_weight"] == 0.0 and state["prior_prompts"] is None

    for args, needle in ((["--prior-prompts", tmp_path / "none.txt"], "does not exist"),
                         (["--prior-prompts", "none", "--prior-weight", "1"], "needs prior prompts"),
                         (["--prior-prompts", "auto", "--trigger", "[X]"], "no caption contains the trigger"),
                         (["--prior-weight", "-1", "--prior-prompts", "auto"], "--prior-weight must be >= 0")):
        rc, _, err = cli_in_process("train", "--data", image_folder, "--steps", "1", "--out", tmp_path / "bad", *args)
        assert_one_line_error(rc, err, needle)


@needs_weights
def test_preview_teacher_shows_what_the_teacher_draws_before_training(tmp_path):
    rc, _, err = run_cli("toy-data", "--out", tmp_path / "data", "--n", "2")
    assert rc == 0, err
    rc, out, err = run_cli("preview-teacher", "--model", "toy", "--data", tmp_path / "data" / "star", "--n", "4",
                           "--out", tmp_path / "preview")
    assert rc == 0, err
    report = json.loads((tmp_path / "preview" / "report.json").read_text())
    captions = sum(len((tmp_path / "data" / "star" / f"star_{i:02d}.txt").read_text().split("\n")) - 1 for i in range(2))
    assert len(report) == captions and all(len(e["psnr_db"]) == 4 and sum(e["shapes"].values()) == 4 for e in report)
    stars = sum(e["shapes"].get("star", 0) for e in report) / (4 * len(report))
    assert stars >= 0.5, report  # the shipped base's teacher copies the star (about 88 % in its acceptance)
    assert all(v > 10 for e in report for v in e["psnr_db"])  # near the target, not noise
    assert sorted(p.name for p in (tmp_path / "preview").glob("*.png")) == ["star_00.png", "star_01.png"]
    assert "drawn as" in out and "PSNR" in out


def test_previews_draw_the_users_sample_prompts_from_the_starting_model_on(tmp_path, image_folder):
    """--sample-prompts: one tile per prompt; step 0 is the starting model on the same noise;
    without the flag, four default prompts."""
    prompts = tmp_path / "samples.txt"
    prompts.write_text("a yellow [V] on a navy background\na red circle\na blue square\n")
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--model", "toy", "--data", image_folder, "--steps", "2", "--preview-every", "2",
                         "--rank", "4", "--k", "2", "--sample-prompts", prompts, "--teacher-check", "off",
                         "--out", run)
    assert rc == 0, err
    start, end = (Image.open(run / "previews" / f"step_{s:06d}.png") for s in (0, 2))
    tile = 32 * 4 + 2  # 4x upscaled toy images, 2 px gaps
    assert start.size == end.size == (3 * tile + 2, tile + 2)
    assert start.tobytes() != end.tobytes()
    rc, _, err = run_cli("train", "--model", "toy", "--data", image_folder, "--steps", "1", "--preview-every", "1",
                         "--rank", "4", "--k", "2", "--teacher-check", "off", "--out", tmp_path / "default")
    assert rc == 0, err
    assert Image.open(tmp_path / "default" / "previews" / "step_000000.png").size == (4 * tile + 2, tile + 2)
    rc, _, err = run_cli("train", "--model", "toy", "--data", image_folder, "--steps", "1", "--sample-prompts",
                         tmp_path / "missing.txt", "--out", tmp_path / "bad")
    assert rc == 2 and "sample prompt file" in err and "missing.txt" in err

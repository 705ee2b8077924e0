"""The `dopsd` command line, as a user runs it (subprocesses)."""
import json

import pytest
from PIL import Image

from dopsd_core.lora import read_lora_file
from testutil import run_cli, write_image_folder


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
    for f in ("lora.safetensors", "loss.csv", "loss.png", "state/teacher.safetensors", "state/optimizer.safetensors",
              "state/state.json"):
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
    rc, _, err = run_cli("train", "--data", data, "--steps", "2", "--out", out)
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
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "2", "--out", out, *flags)
    assert_one_line_error(rc, err, needle)
    assert not out.exists() or not (out / "lora.safetensors").exists()


def test_unusable_out_and_bad_resume(tmp_path, image_folder):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "2", "--out", a_file)
    assert_one_line_error(rc, err, "is a file")
    rc, _, err = run_cli("train", "--resume", tmp_path / "not_a_run")
    assert_one_line_error(rc, err, "is not a run folder")
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "1", "--out", run, "--rank", "4", "--k", "1")
    assert rc == 0, err
    lora_before = (run / "lora.safetensors").read_bytes()
    rc, _, err = run_cli("train", "--resume", run, "--steps", "3", "--rank", "8")
    assert_one_line_error(rc, err, "another training config", "rank=4")
    other_weights = tmp_path / "other.safetensors"
    from dopsd_core.toy.denoiser import random_toy, save_toy
    save_toy(random_toy(seed=5), other_weights)
    rc, _, err = run_cli("train", "--resume", run, "--steps", "3", "--weights", other_weights)
    assert_one_line_error(rc, err, "trained on model")
    rc, _, err = run_cli("train", "--data", image_folder, "--steps", "3", "--out", run)
    assert_one_line_error(rc, err, "already holds a run", "--resume")
    assert (run / "lora.safetensors").read_bytes() == lora_before  # nothing was overwritten

"""`dopsd train|sample|preview-teacher --model flux2-klein|z-image --comfyui ...`: ComfyUI as a library.

The CLI runs in this process against the real ComfyUI (COMFYUI_PATH). The tiny klein DiT is a file in the
released layout, loaded by the CLI's own UNETLoader call. What ComfyUI's loaders recognise only at full size
(the tiny Qwen3 text encoders, the tiny VAEs, the tiny Z-Image DiT) is built here by the same builders the
test node pack runs in the server, and handed to the CLI in place of its file loading
(headless.load_models); everything after that is the CLI's. The node side runs in the server from the
same seeds: CLI and node must write the same LoRA.

File loading and its checks run for real where a tiny file can show them: the klein DiT, a FLUX.1 file
(an unsupported family), a klein file named as Z-Image, a text encoder too narrow for the DiT, a missing
ComfyUI folder, a Z-Image run without its Qwen3-VL folder.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui.hostutil import fresh_name, graph, node_error_text
from comfyui.test_family_graphs import FAMILIES, RES, _write_images, dataset_node, loaders, vlm_name  # noqa: F401
from comfyui.testing_nodes import tiny_models

STEPS = 3
EQUAL_TOL = 1e-6


@pytest.fixture()
def one_thread():
    """The server runs with OMP_NUM_THREADS=1; the same thread count here gives the same float sums."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_models(family: str, klein_file: Path, vlm_folder: Path | None):
    from comfyui.tiny_cli import tiny_family_models
    return tiny_family_models(family, klein_file, vlm_folder)


def _cli_args(family, comfy, klein_file, data: Path, out: Path, vlm_folder, adapter="lora") -> list[str]:
    args = ["train", "--model", family, "--adapter", adapter, "--comfyui", os.environ["COMFYUI_PATH"], "--diffusion-model", str(klein_file),
            "--text-encoder", str(klein_file), "--vae", str(klein_file), "--data", str(data), "--out", str(out),
            "--steps", str(STEPS), "--rank", "4", "--alpha", "4", "--lr", "1e-2", "--optimizer", "adamw",
            "--batch-size", "1", "--grad-accum", "1", "--seed", "0", "--k", "4", "--teacher", "ema",
            "--ema-decay", "0.9999", "--loss-weight", "x0", "--states", "all", "--save-every", str(STEPS),
            "--preview-every", str(STEPS),  # (previews draw from their own generator: the LoRA is the same)
            "--resolution", str(RES), "--prior-prompts", "none", "--teacher-check", "off"]
    return args + (["--vlm", str(vlm_folder)] if vlm_folder else [])


@pytest.mark.parametrize("family,adapter", [("flux2-klein", "lora"), ("z-image", "lora"), ("flux2-klein", "loha"),
                                            ("z-image", "lokr")])
def test_the_cli_trains_the_lora_the_node_trains(comfy, comfy_lib, family, adapter, request, tmp_path, monkeypatch,
                                                 one_thread, capsys):
    from dopsd_core import cli
    from dopsd_core.hosts import headless
    vlm = request.getfixturevalue("vlm_name") if family == "z-image" else None
    vlm_folder = comfy.base / "models" / "dopsd_vlm" / vlm if vlm else None
    klein_file = comfy.base / "models" / "diffusion_models" / tiny_models.KLEIN_FILE
    data = fresh_name("cli_family")
    _write_images(comfy.input_dir / data, 2, seed=11)

    # the node, in the server
    run_name = fresh_name("cli_vs_node")
    trainer = (6, "DOPSDTrainer", {"model": ["1", 0], "dataset": ["5", 0], "steps": STEPS, "gpu_preset": "family default",
                                   "rank": 4, "lr": 1e-2, "optimizer": "adamw", "batch_size": 1, "grad_accum": 1,
                                   "seed": 0, "checkpointing": False, "save_every": STEPS, "preview_every": 0,
                                   "run_name": run_name, "resume": False, "k": 4, "teacher": "ema",
                                   "ema_decay": 0.9999, "loss_weight": "x0", "states": "all", "prior_weight": 0.0,
                                   "teacher_check": "off", "adapter": adapter})
    entry = comfy.run(graph(*loaders(family, vlm), dataset_node(data, family, prior_prompts=""), trainer))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    node_lora = load_file(str(comfy.output_dir / "dopsd" / run_name / "lora.safetensors"))

    # the CLI, here, on the same models
    models = _tiny_models(family, klein_file, vlm_folder)
    monkeypatch.setattr(headless, "load_models", lambda spec, files, teacher=True: dataclasses.replace(models))
    out = tmp_path / "run"
    assert cli.main(_cli_args(family, comfy, klein_file, comfy.input_dir / data, out, vlm_folder, adapter)) == 0
    assert f"trained {STEPS} steps" in capsys.readouterr().out
    cli_lora = load_file(str(out / "lora.safetensors"))
    assert cli_lora.keys() == node_lora.keys() and len(cli_lora) > 0
    worst = max(float((cli_lora[k].float() - node_lora[k].float()).abs().max()) for k in cli_lora)
    assert worst <= EQUAL_TOL, f"CLI vs node LoRA differ by {worst}"
    output_side = {"lora": "lora_up", "loha": "hada_w2_a", "lokr": "lokr_w2_a"}[adapter]  # zero at the start
    moved = max(float(v.float().abs().max()) for k, v in cli_lora.items() if output_side in k)
    assert moved > 0, f"the {adapter} did not train"
    record = headless.read_record(out)
    assert record["model"] == family and record["resolution"] == RES and Path(record["diffusion_model"]) == klein_file
    assert list((out / "dataset").glob("*.safetensors")), "the dataset is cached in the run folder"
    assert (out / "previews" / f"step_{STEPS:06d}.png").is_file(), "previews decoded through the family's VAE"

    # resume with no model flags: the run's comfyui.json names them; two more steps continue from step 3
    assert cli.main(["train", "--resume", str(out), "--steps", str(STEPS + 2)]) == 0
    assert "resuming" in capsys.readouterr().err
    from dopsd_core.run_folder import read_run_state
    assert read_run_state(out)["step"] == STEPS + 2

    # `dopsd sample --lora` applies it the stock loader's way: same seed, other samples than the base
    files = ["--model", family, "--comfyui", os.environ["COMFYUI_PATH"], "--diffusion-model", str(klein_file),
             "--text-encoder", str(klein_file), "--vae", str(klein_file), "--n", "1", "--prompt", "a photo of [V]",
             "--width", str(RES), "--height", str(RES)]
    assert cli.main(["sample", *files, "--out", str(tmp_path / "base")]) == 0
    assert cli.main(["sample", *files, "--lora", str(out / "lora.safetensors"), "--out", str(tmp_path / "lora")]) == 0
    import numpy as np
    from PIL import Image
    base, tuned = (np.asarray(Image.open(tmp_path / d / "sample_000.png"), dtype=np.float32) for d in ("base", "lora"))
    assert np.abs(base - tuned).max() > 0, "the LoRA must change the sample"


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_and_preview_teacher_run_headless(comfy, comfy_lib, family, request, tmp_path, monkeypatch, capsys):
    from dopsd_core import cli
    from dopsd_core.hosts import headless
    vlm = request.getfixturevalue("vlm_name") if family == "z-image" else None
    vlm_folder = comfy.base / "models" / "dopsd_vlm" / vlm if vlm else None
    klein_file = comfy.base / "models" / "diffusion_models" / tiny_models.KLEIN_FILE
    models = _tiny_models(family, klein_file, vlm_folder)
    monkeypatch.setattr(headless, "load_models", lambda spec, files, teacher=True: dataclasses.replace(models))
    files = ["--model", family, "--comfyui", os.environ["COMFYUI_PATH"], "--diffusion-model", str(klein_file),
             "--text-encoder", str(klein_file), "--vae", str(klein_file)] + (["--vlm", str(vlm_folder)] if vlm else [])
    out = tmp_path / "samples"
    assert cli.main(["sample", *files, "--prompt", "a photo of a cat", "--n", "2", "--width", str(RES),
                     "--height", str(RES), "--out", str(out)]) == 0
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 2
    from PIL import Image
    import numpy as np
    a, b = (torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)) for p in pngs)
    assert Image.open(pngs[0]).size == (RES, RES) and float((a - b).abs().max()) > 0, "two noises, two samples"

    data = tmp_path / "data"
    _write_images(data, 1, seed=12)
    prev = tmp_path / "preview"
    assert cli.main(["preview-teacher", *files, "--data", str(data), "--resolution", str(RES), "--n", "2",
                     "--out", str(prev)]) == 0
    import json
    report = json.loads((prev / "report.json").read_text())
    assert [e["image"] for e in report] == ["img_0.png"] and len(report[0]["psnr_db"]) == 2
    assert (prev / "img_0.png").is_file() and "PSNR to the target" in capsys.readouterr().out


def _main_error(argv, capsys) -> str:
    from dopsd_core import cli
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dopsd: error:"), err
    return err[0]


def test_bad_model_files_get_one_line_and_exit_2(comfy, comfy_lib, tmp_path, capsys):
    """The real loading path: nothing is patched."""
    dm = comfy.base / "models" / "diffusion_models"
    klein, flux1 = dm / tiny_models.KLEIN_FILE, dm / tiny_models.FLUX1_FILE
    data = tmp_path / "data"
    _write_images(data, 1, seed=13)
    comfyui = os.environ["COMFYUI_PATH"]

    def train(*extra, model="flux2-klein", root=comfyui):
        return ["train", "--model", model, "--comfyui", str(root), "--data", str(data), "--out",
                str(tmp_path / fresh_name("run")), *extra]
    files = ["--text-encoder", str(klein), "--vae", str(klein)]

    msg = _main_error(train("--diffusion-model", str(klein), *files, root=tmp_path), capsys)
    assert "is not a ComfyUI folder" in msg
    msg = _main_error(train("--diffusion-model", str(flux1), *files), capsys)
    assert "FLUX.2-klein" in msg and "Z-Image-Turbo" in msg, msg  # names the supported families
    msg = _main_error(train("--diffusion-model", str(klein), *files, model="z-image"), capsys)
    assert "--vlm" in msg
    vlm_dir = tmp_path / "vlm"
    tiny_models.write_tiny_qwen3vl(vlm_dir)
    capsys.readouterr()  # transformers' progress bars while it wrote the folder
    msg = _main_error(train("--diffusion-model", str(klein), *files, "--vlm", str(vlm_dir), model="zimage"), capsys)
    assert "is a FLUX.2-klein (4B/9B) model, not Z-Image-Turbo" in msg and "--model flux2-klein" in msg
    sample = ["sample", "--model", "zimage", "--comfyui", comfyui, "--diffusion-model", str(klein), *files,
              "--prompt", "a cat", "--out", str(tmp_path / "samples")]
    msg = _main_error(sample, capsys)  # sampling needs no Qwen3-VL: the model itself is what is wrong
    assert "is a FLUX.2-klein (4B/9B) model, not Z-Image-Turbo" in msg
    msg = _main_error(train("--diffusion-model", "no_such_model.safetensors", *files), capsys)
    assert "no_such_model.safetensors" in msg and "models/diffusion_models" in msg
    msg = _main_error(train("--diffusion-model", str(klein)), capsys)
    assert "--text-encoder" in msg and "--vae" in msg
    assert not list(tmp_path.glob("run_*")), "a refused run leaves no folder behind"


def test_a_text_encoder_too_narrow_for_the_model_is_refused(comfy, comfy_lib):
    from dopsd_core.errors import DopsdError
    from dopsd_core.hosts import headless
    from dopsd_core.hosts.families import detect_family
    klein = headless.load_diffusion_model(comfy.base / "models" / "diffusion_models" / tiny_models.KLEIN_FILE,
                                          "default")
    fam = detect_family(klein.model)
    headless.check_text_encoder(fam, klein, tiny_models.tiny_text_encoder("flux2-klein"), "klein_te")  # 3 x 32 = 96
    with pytest.raises(DopsdError, match=r"gives 64-wide contexts but this FLUX.2-klein \(4B/9B\) model reads 96"):
        headless.check_text_encoder(fam, klein, tiny_models.tiny_text_encoder("z-image"), "qwen_3_4b")


def test_two_processes_under_torchrun_train_tiny_klein_as_one(comfy, comfy_lib, tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU) x batch 1 each against 1 process x batch 2: the same LoRA up
    to the order of the gradient sum (the toy's bound in tests/test_distributed.py)."""
    import subprocess
    import sys
    klein_file = comfy.base / "models" / "diffusion_models" / tiny_models.KLEIN_FILE
    data = tmp_path / "data"
    _write_images(data, 2, seed=14)
    script = str(Path(__file__).parent / "tiny_cli.py")
    args = ["train", "--model", "klein", "--comfyui", os.environ["COMFYUI_PATH"], "--diffusion-model", str(klein_file),
            "--text-encoder", str(klein_file), "--vae", str(klein_file), "--data", str(data), "--steps", "2",
            "--rank", "4", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--prior-batch", "2",
            "--resolution", str(RES), "--teacher-check", "off", "--k", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOPSD_DIST_TIMEOUT": "60"}
    one = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
                          *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel: 2 processes, 1 of the batch of 2 each" in two.stderr
    a, b = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-4, f"2 processes vs 1: {worst}"
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_up" in k) > 0, "trained"

"""Helpers shared by the tests (importable: pyproject sets pytest's pythonpath to tests/)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from dopsd_core.toy.denoiser import BASE_WEIGHTS
from dopsd_core.toy.model import ToyConfig

TINY = ToyConfig(width=32, depth=2, heads=2, context_dim=16, text_depth=1)

# The training config of the trainer and optimizer tests (test_trainer.py, test_optim.py).
CFG = dict(method="dopsd", rank=4, alpha=4.0, lr=2e-3, batch_size=2, k=4, teacher="ema", ema_decay=0.9,
           schedule="cosine", warmup=3, seed=0)

needs_weights = pytest.mark.skipif(
    not BASE_WEIGHTS.is_file(),
    reason="the toy base's weights are missing (the lab's toy-pretrain and toy-distill regenerate them)")


def write_image_folder(folder: Path, n: int = 3, size=(40, 36)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(230, 30, 30), (30, 200, 60), (40, 80, 250), (240, 220, 30)]
    for i in range(n):
        im = Image.new("RGB", size, (0, 0, 0))
        ImageDraw.Draw(im).ellipse([4 + 2 * i, 4, 24 + 2 * i, 24], fill=colours[i % 4])
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a red [V] on a black background\n\na [V]\n")
    return folder


def run_cli(*args, cwd=None):
    """`python -m dopsd_core ARGS` -> (rc, stdout, stderr). A new `train` run skips the pre-flight teacher check
    unless the test names --teacher-check (it samples teacher and student before step 1, about a third of a
    short test run; tests/toy/test_teacher_check.py and test_cli.py test the check and its default)."""
    args = [str(a) for a in args]
    if args[:1] == ["train"] and "--teacher-check" not in args and "--resume" not in args:
        args += ["--teacher-check", "off"]
    # one thread: the toy is small, and threads only contend with other processes on a small machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dopsd_core", *args], capture_output=True, text=True,
                         cwd=cwd, env=env)
    return out.returncode, out.stdout, out.stderr


def cli_in_process(*args):
    """dopsd_core.cli.main(ARGS) in this process -> (rc, stdout, stderr), as run_cli. For refusals, which stop
    before training: it saves the ~2 s a new interpreter takes to import torch. Runs that train, stop on a
    signal or test the entry point use run_cli (a real process)."""
    import contextlib
    import io

    from dopsd_core import cli
    args = [str(a) for a in args]
    if args[:1] == ["train"] and "--teacher-check" not in args and "--resume" not in args:
        args += ["--teacher-check", "off"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(args)
        except SystemExit as e:  # argparse's refusals
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def records_for(den, folder):
    from dopsd_core.data import load_image_folder
    return den.build_records(load_image_folder(folder, den.resolution))


def lora_tensors(den):
    lora = den.lora()
    return {**{f"s.{k}": v for k, v in lora.state_dict_comfy("student").items()},
            **{f"t.{k}": v for k, v in lora.state_dict_comfy("teacher").items()}}

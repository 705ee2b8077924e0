"""The lab's entry point, `python -m experiments.toy.lab`, as a user runs it from the repository's root
(subprocesses), and the committed study report regenerated from the committed runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testutil import needs_weights

ROOT = Path(__file__).resolve().parents[4]
STUDY = ROOT / "experiments" / "toy" / "study"
COMMANDS = ("experiment", "toy-pretrain", "toy-distill", "toy-evaluator", "toy-acceptance")


def run_lab(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "experiments.toy.lab", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    return out.returncode, out.stdout, out.stderr


def test_the_lab_has_its_commands_and_dopsd_has_none_of_them():
    rc, out, err = run_lab("--help")
    assert rc == 0, err
    assert all(c in out for c in COMMANDS)
    from dopsd_core.cli import build_parser as dopsd_parser
    from dopsd_core.errors import DopsdError
    from experiments.toy.lab.cli import build_parser
    assert build_parser().parse_args(["experiment", "--out", "x", "--stage", "budgetchains"]).stage == "budgetchains"
    dopsd = dopsd_parser()
    assert dopsd.parse_args(["toy-data", "--out", "x"]).command == "toy-data"
    for c in COMMANDS:
        with pytest.raises(DopsdError, match="invalid choice"):
            dopsd.parse_args([c, "--out", "x"])


def test_bad_arguments_are_one_line_errors(tmp_path):
    rc, _, err = run_lab("experiment", "--out", tmp_path, "--stage", "nope")
    assert rc == 2 and err.startswith("lab: error:") and len(err.strip().splitlines()) == 1, err
    rc, _, err = run_lab("toy-distill", "--work", tmp_path)
    assert rc == 2 and "has no pretrained.safetensors" in err and "experiments.toy.lab toy-pretrain" in err
    rc, _, err = run_lab("experiment", "--out", tmp_path, "--stage", "report", "--jobs", "0")
    assert rc == 2 and "--jobs must be at least 1" in err
    rc, _, err = run_lab("experiment", "--out", tmp_path, "--only")
    assert rc == 2 and "--only runs one stage's runs" in err


@needs_weights
def test_the_committed_study_report_regenerates_byte_for_byte(tmp_path):
    """The study's report stage reads only the cached runs: run on a copy of the committed study, it writes
    the committed results.md, results.json and fronts.png again (the lab's results reproduce)."""
    out = tmp_path / "study"
    shutil.copytree(STUDY, out, ignore=shutil.ignore_patterns("train", "data"))
    for f in ("results.md", "results.json", "fronts.png"):
        (out / f).unlink()
    rc, stdout, err = run_lab("experiment", "--out", out, "--stage", "report")
    assert rc == 0, err
    assert stdout.startswith("# Toy trade-off study")
    for f in ("results.md", "results.json", "fronts.png"):
        assert (out / f).read_bytes() == (STUDY / f).read_bytes(), f

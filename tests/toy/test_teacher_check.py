"""The pre-flight teacher check on the shipped toy: it passes the three held-out concepts, and flags a
dataset whose teacher draws something else (captions that name another shape), saying what it draws."""
import json

import pytest

from dopsd_core.data import load_image_folder
from dopsd_core.teacher_check import check_teacher, toy_judge
from dopsd_core.toy.denoiser import load_toy
from dopsd_core.toy.render import export_concept_folder

from testutil import needs_weights, run_cli

pytestmark = needs_weights


def _records(folder, captions: str | None = None):
    if captions is not None:
        for txt in folder.glob("*.txt"):
            txt.write_text(captions + "\n")
    den = load_toy()
    records = den.build_records(load_image_folder(folder, den.resolution))
    den.add_lora(4, 4.0)
    return den, records


@pytest.fixture(scope="module")
def judge():
    return toy_judge()


@pytest.mark.parametrize("shape", ["star", "heart", "crescent"])
def test_the_teacher_of_every_held_out_concept_passes(tmp_path, judge, shape):
    export_concept_folder(shape, tmp_path / shape, n=4)
    den, records = _records(tmp_path / shape)
    report = check_teacher(den, records, 4, judge=judge, decode=den.decode)
    assert report.passed, report.summary()
    assert all(f"target is a {shape}" in e["verdict"] for e in report.entries)


def test_a_teacher_that_draws_another_shape_is_flagged_with_what_it_draws(tmp_path, judge):
    export_concept_folder("star", tmp_path / "bad", n=4)
    den, records = _records(tmp_path / "bad", captions="a circle")  # the caption fights the image
    report = check_teacher(den, records, 4, judge=judge, decode=den.decode)
    assert not report.passed and "SFT + prior" in report.advice
    failed = [e for e in report.entries if not e["passed"]]
    assert failed and all(e["verdict"].startswith("target is a star; teacher draws ") for e in failed)
    assert all("star 2/2" not in e["verdict"] for e in failed)


def test_the_latent_rule_without_a_judge(tmp_path):
    """Any family: the teacher's samples must be nearer the target than the caption alone draws."""
    export_concept_folder("heart", tmp_path / "heart", n=2)
    den, records = _records(tmp_path / "heart")
    report = check_teacher(den, records, 4)
    assert report.passed and all(e["teacher_psnr_db"] > e["student_psnr_db"] + 1 for e in report.entries)


def test_the_cli_reports_it_and_stops_when_asked(tmp_path):
    export_concept_folder("star", tmp_path / "bad", n=4)
    for txt in (tmp_path / "bad").glob("*.txt"):
        txt.write_text("a circle\n")
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--data", tmp_path / "bad", "--steps", "2", "--prior-prompts", "none",
                         "--teacher-check", "stop", "--out", run)
    assert rc == 2 and "--teacher-check stop" in err.splitlines()[-1]
    report = json.loads((run / "teacher_check.json").read_text())
    assert not report["passed"] and report["seconds"] > 0
    assert not (run / "state").exists()  # stopped before the first step


def test_a_new_cli_run_checks_its_teacher_by_default_and_warns_only():
    """The default the tests' run_cli turns off for speed: a user's new run checks (warn), never stops."""
    from dopsd_core.cli import build_parser
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y"])
    assert args.teacher_check == "warn"

"""nodes/live.py, the server side of the live training view, without ComfyUI: run records per
trainer node, run ids, JSON-safe numbers, history snapshots, and the preview route's name checks."""
import importlib.util
import json
import math

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def live():
    spec = importlib.util.spec_from_file_location("dopsd_live_under_test", ROOT / "nodes" / "live.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a fresh module: empty records
    sent = []
    mod._send = lambda event, data: sent.append((event, json.loads(json.dumps(data, allow_nan=False))))
    mod.sent = sent
    return mod


def test_each_trainer_node_keeps_its_own_run(live):
    a = live.run_started("3", "run_a", "dopsd", 10)
    b = live.run_started("7", "run_b", "sft", 5)
    for step in range(1, 4):
        live.run_step("3", a, step, 10, 1.0 / step, 1e-3, 2.0, 3.5)
    live.run_step("7", b, 1, 5, 0.5, 1e-3, 2.0, 2.0)
    runs = {r["node"]: r for r in live.all_runs()}
    assert runs["3"]["points"] == [[1, 1.0, None], [2, 0.5, None], [3, pytest.approx(1 / 3), None]] and runs["3"]["run"] == "run_a"
    assert runs["7"]["points"] == [[1, 0.5, None]] and runs["7"]["method"] == "sft"
    assert [e for e, d in live.sent].count("dopsd.progress") == 2 + 4
    assert live.sent[0][1]["points"] == [] and live.sent[0][1]["id"] == a  # a run start carries the whole record


def test_a_requeued_run_gets_a_new_id_and_late_events_of_the_old_one_are_dropped(live):
    old = live.run_started("3", "r", "dopsd", 10)
    live.run_step("3", old, 1, 10, 1.0, 1e-3, 1.0, 9.0)
    new = live.run_started("3", "r", "dopsd", 10)
    assert new != old
    live.run_step("3", old, 2, 10, 9.0, 1e-3, 1.0, 8.0)  # the old run's thread, late
    live.run_preview("3", old, 2, ROOT / "x" / "step_000002.png")
    live.run_finished("3", old, "cancelled")
    rec = live.snapshot("3")
    assert rec["id"] == new and rec["points"] == [] and rec["preview"] is None and rec["status"] == "running"
    live.run_finished("3", new, "finished")
    assert live.snapshot("3")["status"] == "finished"


def test_non_finite_numbers_travel_as_null(live):
    rid = live.run_started("1", "r", "dopsd", 3)
    live.run_step("1", rid, 1, 3, math.nan, 1e-3, math.inf, math.inf)
    event = live.sent[-1][1]  # the fixture's json.dumps(allow_nan=False) would have raised otherwise
    assert event["loss"] is None and event["it_per_s"] is None and event["eta_s"] is None
    json.dumps(live.all_runs(), allow_nan=False)


def test_snapshot_is_a_copy_and_long_runs_are_decimated(live, monkeypatch):
    monkeypatch.setattr(live, "MAX_POINTS", 100)
    rid = live.run_started("1", "r", "dopsd", 1000)
    snap = live.snapshot("1")
    snap["points"].append([0, 0.0])
    assert live.snapshot("1")["points"] == []
    for step in range(1, 302):
        live.run_step("1", rid, step, 1000, float(step), 1e-3, 1.0, 1.0)
    pts = live.snapshot("1")["points"]
    assert len(pts) <= 100 and pts[0][0] == 1 and pts[-1][0] == 301
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)


def test_preview_url_and_path_accept_only_run_preview_names(live, tmp_path):
    rid = live.run_started("1", "my run&x", "dopsd", 3)
    live.run_preview("1", rid, 2, tmp_path / "step_000002.png")
    assert live.snapshot("1")["preview"]["url"] == "/dopsd/preview?run=my%20run%26x&file=step_000002.png"
    png = tmp_path / "dopsd" / "star" / "previews" / "step_000020.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG")
    assert live.preview_path(tmp_path, "star", "step_000020.png") == png
    for run, file in [("star", "step_000021.png"), ("..", "step_000020.png"), ("../star", "step_000020.png"),
                      ("star/..", "step_000020.png"), ("star", "../../x.png"), ("star", "step_20.png"),
                      ("/etc", "step_000020.png"), ("", "step_000020.png"), ("star", "")]:
        assert live.preview_path(tmp_path, run, file) is None, (run, file)


def test_a_stopped_run_reports_the_step_its_folder_holds(live):
    """A Cancel inside step 4 keeps step 3: the page must show the saved step, not the last one on screen."""
    rid = live.run_started("5", "r", "dopsd", 10)
    for step in range(1, 4):
        live.run_step("5", rid, step, 10, 1.0, 1e-3, 1.0, 1.0)
    live.run_finished("5", rid, "cancelled", saved_step=3)
    event = live.sent[-1][1]
    assert event["status"] == "cancelled" and event["saved_step"] == 3 and event["step"] == 3
    assert live.snapshot("5")["saved_step"] == 3
    other = live.run_started("6", "r2", "dopsd", 10)
    live.run_finished("6", other, "cancelled")  # stopped before anything was saved
    assert live.sent[-1][1]["saved_step"] is None and live.snapshot("6")["saved_step"] is None


def test_a_note_reaches_the_page_and_stays_in_the_record(live):
    """The teacher check's result: shown on the node, a warning when it failed."""
    rid = live.run_started("8", "r", "dopsd", 10)
    live.run_note("8", rid, "teacher check: 1/4 training images drawn", ok=False)
    assert live.sent[-1][1]["note"] == {"text": "teacher check: 1/4 training images drawn", "ok": False}
    assert live.snapshot("8")["note"]["ok"] is False
    live.run_note("8", "old-id", "late", ok=True)  # another run's: dropped
    assert live.snapshot("8")["note"]["text"].startswith("teacher check")


def test_the_start_preview_is_kept_beside_the_latest_and_points_carry_the_prior_term(live, tmp_path):
    rid = live.run_started("1", "r", "dopsd", 4)
    live.run_preview("1", rid, 0, tmp_path / "step_000000.png")
    live.run_step("1", rid, 1, 4, 0.5, 1e-3, 1.0, 3.0, prior_loss=0.25)
    live.run_step("1", rid, 2, 4, 0.4, 1e-3, 1.0, 2.0)  # a step without the prior term (prior_every)
    live.run_preview("1", rid, 2, tmp_path / "step_000002.png")
    snap = live.snapshot("1")
    assert snap["start"]["step"] == 0 and snap["start"]["url"].endswith("file=step_000000.png")
    assert snap["preview"]["step"] == 2 and snap["preview"]["url"].endswith("file=step_000002.png")
    assert snap["points"] == [[1, 0.5, 0.25], [2, 0.4, None]]

"""Bad inputs and Cancel through the real executor: a clear error in the UI, the server keeps running,
folders outside input/ are refused unread, and a cancelled run keeps the step it stopped at."""
import json
import time

from safetensors import safe_open

from dopsd_core.toy.render import export_concept_folder
from comfyui.hostutil import fresh_name, graph, node_error_text


def dataset_graph(folder: str):
    return graph((1, "DOPSDToyModelLoader", {}),
                 (2, "DOPSDDataset", {"model": ["1", 0], "folder": folder, "caption_template": "a [V]",
                                      "resolution": 32, "toy_text_encoder": ["1", 1]}),
                 (3, "DOPSDTeacherPreview", {"model": ["1", 0], "dataset": ["2", 0], "steps": 4, "seed": 0}),
                 (4, "SaveLatent", {"samples": ["3", 0], "filename_prefix": f"latents/{fresh_name('teacher')}"}))


def test_bad_folders_show_clear_errors_and_the_server_survives(comfy):
    empty = comfy.input_dir / "empty_folder"
    empty.mkdir(exist_ok=True)
    mismatch = comfy.input_dir / "mismatch"
    export_concept_folder("heart", mismatch, n=2)
    (mismatch / "heart_01.txt").unlink()
    for folder, needle in (("empty_folder", "has no images"), ("mismatch", "heart_01.png has no caption"),
                           ("does_not_exist", "does not exist")):
        entry = comfy.run(dataset_graph(folder))
        assert entry["status"]["status_str"] == "error"
        msg = node_error_text(entry)
        assert "DopsdError" in msg and needle in msg, msg
    assert comfy.get("/system_stats")["system"]  # still serving


def test_folders_outside_the_input_folder_are_refused_before_anything_is_read(comfy, tmp_path):
    """A networked ComfyUI must not read image folders anywhere on its disk for whoever has the page.
    The outside folder holds an undecodable image: reading it would fail with another error."""
    outside = tmp_path / "outside_concept"
    export_concept_folder("star", outside, n=2)
    (outside / "star_00.png").write_bytes(b"not a png")
    cache = comfy.output_dir / "dopsd" / "cache"
    before = set(cache.glob("*")) if cache.exists() else set()
    escape = "../" * (len(comfy.input_dir.parts) + 2) + str(outside).lstrip("/")  # climbs out of input/
    for folder in (str(outside), escape, "sub/../../" + outside.name):
        entry = comfy.run(dataset_graph(folder))
        assert entry["status"]["status_str"] == "error"
        msg = node_error_text(entry)
        assert "outside ComfyUI's input folder" in msg and str(comfy.input_dir) in msg, msg
        assert "decode" not in msg and "star_00" not in msg, msg
    assert (set(cache.glob("*")) if cache.exists() else set()) == before
    inside = comfy.input_dir / "inside" / "concept"
    export_concept_folder("star", inside, n=2)
    for folder in ("inside/concept", "inside/../inside/concept", str(inside)):  # within input/: allowed
        entry = comfy.run(dataset_graph(folder))
        assert entry["status"]["status_str"] == "success", node_error_text(entry)


def test_teacher_preview_runs_on_a_good_folder(comfy):
    good = comfy.input_dir / "crescent"
    export_concept_folder("crescent", good, n=2)
    entry = comfy.run(dataset_graph("crescent"))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)


def test_cancel_mid_run_leaves_a_valid_run_folder(comfy):
    data = comfy.input_dir / "toy_star_cancel"
    if not data.exists():
        export_concept_folder("star", data, n=4)
    run = fresh_name("cancel")
    g = graph((1, "DOPSDToyModelLoader", {}),
              (2, "DOPSDDataset", {"model": ["1", 0], "folder": data.name, "caption_template": "a [V]",
                                   "resolution": 32, "toy_text_encoder": ["1", 1]}),
              (3, "DOPSDTrainer", {"model": ["1", 0], "dataset": ["2", 0], "steps": 100000,
                                   "gpu_preset": "family default", "rank": 4, "lr": 1e-3, "optimizer": "adamw",
                                   "batch_size": 1, "grad_accum": 1, "seed": 0, "checkpointing": False,
                                   "save_every": 2, "preview_every": 0, "run_name": run, "resume": False, "k": 2,
                                   "teacher": "ema", "ema_decay": 0.9999, "loss_weight": "x0", "states": "all"}))
    prompt_id = comfy.queue(g)
    state_file = comfy.output_dir / "dopsd" / run / "state" / "state.json"
    deadline = time.time() + 300
    while not state_file.exists() or json.loads(state_file.read_text())["step"] < 4:
        assert time.time() < deadline, "training did not reach step 4"
        time.sleep(0.5)
    status, _ = comfy.post("/interrupt", {})
    assert status == 200
    entry = comfy.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"  # ComfyUI records an interrupted prompt this way
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"]), entry["status"]
    state = json.loads(state_file.read_text())  # the step it stopped at, saved between the every-2 saves
    assert state["step"] >= 4 and len(state["history"]) == state["step"]
    lora_meta = safe_open(str(state_file.parents[1] / "lora.safetensors"), "pt").metadata()
    assert lora_meta["dopsd.step"] == str(state["step"])
    # the run folder resumes: continue it to step + 2 with resume on
    g["3"]["inputs"].update(steps=state["step"] + 2, resume=True)
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    assert json.loads(state_file.read_text())["step"] == state["step"] + 2

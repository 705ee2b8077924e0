"""The trainer node's pre-flight teacher check, through ComfyUI's real executor on the toy: a concept the
teacher draws passes (the note on the node, the report in the run folder); captions that make the
teacher draw another shape are flagged, and with teacher_check stop the node refuses to train."""
import json

from comfyui.hostutil import fresh_name, graph, node_error_text

from dopsd_core.toy.render import export_concept_folder


def _graph(data: str, run: str, mode: str) -> dict:
    return graph(
        (1, "DOPSDToyModelLoader", {}),
        (2, "DOPSDDataset", {"model": ["1", 0], "folder": data, "caption_template": "a [V]", "resolution": 32,
                             "toy_text_encoder": ["1", 1], "prior_prompts": ""}),
        (3, "DOPSDTrainer", {"model": ["1", 0], "dataset": ["2", 0], "steps": 1, "gpu_preset": "family default",
                             "rank": 4, "lr": 1e-3, "optimizer": "adamw", "batch_size": 1, "grad_accum": 1, "seed": 0,
                             "checkpointing": False, "save_every": 0, "preview_every": 0, "run_name": run,
                             "resume": False, "k": 4, "teacher": "ema", "ema_decay": 0.9, "loss_weight": "x0",
                             "states": "all", "teacher_check": mode}))


def test_the_node_checks_its_teacher_before_training(comfy):
    good, bad = fresh_name("tc_good"), fresh_name("tc_bad")
    export_concept_folder("heart", comfy.input_dir / good, n=2)
    export_concept_folder("star", comfy.input_dir / bad, n=2)
    for txt in (comfy.input_dir / bad).glob("*.txt"):
        txt.write_text("a circle\n")  # the caption fights the image: the teacher draws something else

    run = fresh_name("tc_run")
    entry = comfy.run(_graph(good, run, "warn"))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    report = json.loads((comfy.output_dir / "dopsd" / run / "teacher_check.json").read_text())
    assert report["passed"] and report["seconds"] > 0
    note = next(r for r in comfy.get("/dopsd/runs")["runs"] if r["run"] == run)["note"]
    assert note["ok"] and note["text"].startswith("teacher check: 2/2")

    run = fresh_name("tc_run")
    entry = comfy.run(_graph(bad, run, "warn"))  # warn: flagged, trained anyway
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    note = next(r for r in comfy.get("/dopsd/runs")["runs"] if r["run"] == run)["note"]
    assert not note["ok"] and "SFT + prior" in note["text"]
    assert (comfy.output_dir / "dopsd" / run / "state" / "state.json").is_file()

    run = fresh_name("tc_run")
    entry = comfy.run(_graph(bad, run, "stop"))
    assert entry["status"]["status_str"] == "error" and "teacher_check stop" in node_error_text(entry)
    assert not (comfy.output_dir / "dopsd" / run / "state").exists()

"""Cancel between saves keeps the step it stopped at, through ComfyUI's real executor and its own
interrupt mechanism (DOPSDTestCancelAt arms it at a fixed step, so nothing depends on timing):
the run folder holds that step, re-queuing with resume ends where an uninterrupted run ends, and a
resume whose steps equal the saved step hands back the saved LoRA at once."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui.hostutil import fresh_name, graph, node_error_text

from dopsd_core.toy.render import export_concept_folder

STEPS, CANCEL_AT = 6, 3


def trainer_graph(data: str, run: str, resume: bool, cancel_mode: str | None = None, preview_every: int = 0,
                  save_as: str | None = None) -> dict:
    model = ["1", 0]
    nodes = [(1, "DOPSDToyModelLoader", {}),
             (2, "DOPSDDataset", {"model": ["1", 0], "folder": data, "caption_template": "a [V]", "resolution": 32,
                                  "toy_text_encoder": ["1", 1]})]
    if cancel_mode:
        nodes.append((9, "DOPSDTestCancelAt", {"model": ["1", 0], "at": CANCEL_AT, "mode": cancel_mode}))
        model = ["9", 0]
    nodes.append((3, "DOPSDTrainer", {"model": model, "dataset": ["2", 0], "steps": STEPS,
                                      "gpu_preset": "family default", "rank": 8, "lr": 1e-3, "optimizer": "adamw",
                                      "batch_size": 2, "grad_accum": 1, "seed": 0, "checkpointing": False,
                                      "save_every": 0, "preview_every": preview_every, "run_name": run,
                                      "resume": resume, "k": 4, "teacher": "ema", "ema_decay": 0.9,
                                      "loss_weight": "x0", "states": "all"}))
    if save_as:
        nodes.append((4, "DOPSDSaveLoRA", {"lora": ["3", 1], "name": save_as, "overwrite": False}))
    return graph(*nodes)


def run_state(comfy, run: str) -> tuple[dict, dict, str]:
    d = comfy.output_dir / "dopsd" / run
    state = json.loads((d / "state" / "state.json").read_text())
    with safe_open(str(d / "lora.safetensors"), "pt") as f:
        step = f.metadata()["dopsd.step"]
    return state, load_file(str(d / "lora.safetensors")), step


@pytest.fixture(scope="module")
def data(comfy) -> str:
    name = fresh_name("cancel_data")
    export_concept_folder("star", comfy.input_dir / name, n=4)
    return name


@pytest.fixture(scope="module")
def straight(comfy, data):
    run = fresh_name("straight")
    entry = comfy.run(trainer_graph(data, run, resume=False))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    return run_state(comfy, run)


@pytest.mark.parametrize("mode", ["hook", "flag"])
def test_cancel_between_saves_keeps_the_step_and_resume_matches_an_uninterrupted_run(comfy, data, straight, mode):
    s_state, s_lora, _ = straight
    run = fresh_name(f"cancel_{mode}")
    entry = comfy.run(trainer_graph(data, run, resume=False, cancel_mode=mode))
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, entry["status"]

    state, lora, lora_step = run_state(comfy, run)  # save_every 0: only the stop saved anything
    assert state["step"] == CANCEL_AT and lora_step == str(CANCEL_AT)
    assert state["history"] == s_state["history"][:CANCEL_AT]
    assert [p.name for p in (comfy.output_dir / "dopsd" / run / "state").glob("step-*")] == [f"step-{CANCEL_AT:06d}"]

    entry = comfy.run(trainer_graph(data, run, resume=True))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    state, lora, lora_step = run_state(comfy, run)
    assert state["step"] == STEPS and lora_step == str(STEPS)
    assert state["history"] == pytest.approx(s_state["history"], abs=1e-6)
    assert lora.keys() == s_lora.keys()
    worst = max((lora[k] - s_lora[k]).abs().max().item() for k in lora)
    assert worst <= 1e-6, worst

    # steps == the saved step: the trainer returns the saved LoRA without training (preview_every only
    # changes so that ComfyUI executes the trainer again instead of reusing its cached output)
    name = fresh_name("dopsd/resumed")
    entry = comfy.run(trainer_graph(data, run, resume=True, preview_every=STEPS, save_as=name))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    again, _, _ = run_state(comfy, run)
    assert again["step"] == STEPS and again["history"] == state["history"]
    saved = load_file(str(comfy.loras_dir / f"{name}.safetensors"))
    assert saved.keys() == lora.keys() and all((saved[k] == lora[k]).all() for k in lora)

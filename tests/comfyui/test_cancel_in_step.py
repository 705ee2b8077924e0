"""Cancel where a user's click lands: inside a forward of a training step, through ComfyUI's real
executor and its own interrupt flag, on the tiny FLUX.2-klein, the tiny Z-Image and the toy model.

DOPSDTestCancelInForward (tests/comfyui/testing_nodes) sets the flag from a forward hook on the first block
of the diffusion model, half-way through step 3's block calls; the next comfy op raises, as it does
after a click on Cancel. The run folder must hold step 2 (the last complete step: the flag alone would
only be seen by the trainer after step 3), a re-queue with steps 2 must hand back that saved LoRA, and a
resume must end where an uninterrupted run ends.

Also over the HTTP API, as the frontend's Cancel button does it: the toy workflow queued, POST /interrupt
at a random moment after the first preview, then a resume that completes.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comfyui.hostutil import api_prompt, fresh_name, graph, node_error_text
from comfyui.test_cancel_resume import run_state
from comfyui.test_family_graphs import _write_images, dataset_node, loaders, vlm_name  # noqa: F401 (fixture)

from dopsd_core.toy.render import export_concept_folder

REPO = Path(__file__).resolve().parents[2]
STEPS, CANCEL_IN = 4, 3
FAMILIES = ("flux2-klein", "z-image", "toy")


def _model_and_dataset(family: str, folder: str, vlm: str | None) -> list:
    """Node 1 MODEL, node 5 DATASET."""
    if family == "toy":
        return [(1, "DOPSDToyModelLoader", {}),
                (5, "DOPSDDataset", {"model": ["1", 0], "folder": folder, "caption_template": "a [V]",
                                     "resolution": 32, "toy_text_encoder": ["1", 1]})]
    return loaders(family, vlm) + [dataset_node(folder, family)]


def _graph(family: str, folder: str, vlm: str | None, run: str, steps: int = STEPS, resume: bool = False,
           cancel: bool = False, save_as: str | None = None) -> dict:
    nodes = _model_and_dataset(family, folder, vlm)
    model = ["1", 0]
    if cancel:
        nodes.append((9, "DOPSDTestCancelInForward", {"model": ["1", 0], "dataset": ["5", 0], "at_step": CANCEL_IN}))
        model = ["9", 0]
    nodes.append((6, "DOPSDTrainer", {"model": model, "dataset": ["5", 0], "steps": steps,
                                      "gpu_preset": "family default", "rank": 4,
                                      "lr": 1e-3 if family == "toy" else 1e-2, "optimizer": "adamw",
                                      "batch_size": 1, "grad_accum": 1, "seed": 0, "checkpointing": False,
                                      "save_every": 0, "preview_every": 0, "run_name": run, "resume": resume,
                                      "k": 4, "teacher": "ema", "ema_decay": 0.9, "loss_weight": "x0",
                                      "states": "all",
                                      # the check's forwards before step 1 would count as step 1's block calls
                                      "teacher_check": "off"}))
    if save_as:
        nodes.append((7, "DOPSDSaveLoRA", {"lora": ["6", 1], "name": save_as, "overwrite": False}))
    return graph(*nodes)


def _ok(comfy, g: dict) -> dict:
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", node_error_text(entry) or entry["status"]
    return entry


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def folders(comfy) -> dict:
    toy, real = fresh_name("instep_toy"), fresh_name("instep_real")
    export_concept_folder("crescent", comfy.input_dir / toy, n=3)  # no other test caches these images
    _write_images(comfy.input_dir / real, 2, seed=3)
    return {"toy": toy, "flux2-klein": real, "z-image": real}


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_inside_a_forward_keeps_the_last_complete_step(comfy, folders, family, request):
    vlm = request.getfixturevalue("vlm_name") if family == "z-image" else None
    folder = folders[family]
    straight = fresh_name(f"straight_{family}")
    _ok(comfy, _graph(family, folder, vlm, straight))
    s_state, s_lora, _ = run_state(comfy, straight)

    run = fresh_name(f"instep_{family}")
    entry = comfy.run(_graph(family, folder, vlm, run, cancel=True))
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, entry["status"]
    state, lora, lora_step = run_state(comfy, run)  # save_every 0: only the stop saved anything
    assert state["step"] == CANCEL_IN - 1 and lora_step == str(CANCEL_IN - 1)
    assert state["history"] == pytest.approx(s_state["history"][:CANCEL_IN - 1], abs=1e-6)
    live = next(r for r in comfy.get("/dopsd/runs")["runs"] if r["run"] == run)
    assert live["status"] == "cancelled" and live["saved_step"] == CANCEL_IN - 1, live

    # steps == the saved step: the trainer hands back the saved LoRA without training
    name = fresh_name("dopsd/instep")
    _ok(comfy, _graph(family, folder, vlm, run, steps=CANCEL_IN - 1, resume=True, save_as=name))
    saved = load_file(str(comfy.loras_dir / f"{name}.safetensors"))
    assert saved.keys() == lora.keys() and all((saved[k] == lora[k]).all() for k in lora)

    _ok(comfy, _graph(family, folder, vlm, run, resume=True))
    state, lora, lora_step = run_state(comfy, run)
    assert state["step"] == STEPS and lora_step == str(STEPS)
    assert state["history"] == pytest.approx(s_state["history"], abs=1e-6)
    assert _worst(lora, s_lora) <= 1e-6


def _toy_workflow_graph(comfy, folder: str, run: str, resume: bool) -> dict:
    """The shipped toy workflow as the frontend queues it, on a small dataset folder, 40 steps with a
    preview every 5 and no periodic save (only the stop can save anything before the end)."""
    workflow = json.loads((REPO / "workflows" / "dopsd_toy_cpu_demo.json").read_text())
    prompt = api_prompt(workflow, comfy.get("/object_info"))
    node = {n["class_type"]: k for k, n in prompt.items() if n["class_type"].startswith("DOPSD")}
    prompt[node["DOPSDDataset"]]["inputs"]["folder"] = folder
    prompt[node["DOPSDTrainer"]]["inputs"].update(steps=40, save_every=0, preview_every=5, run_name=run,
                                                  resume=resume)
    prompt[node["DOPSDSaveLoRA"]]["inputs"]["name"] = f"dopsd/{run}"
    return prompt


def test_post_interrupt_at_a_random_moment_keeps_a_resumable_step(comfy, folders):
    """The frontend's Cancel: POST /interrupt, at a random moment after the first training preview (so almost
    surely inside a forward or backward). The folder must hold a step at least the last preview's, the
    live view must name it, and a re-queue with resume on completes."""
    run = fresh_name("http_cancel")
    previews = comfy.output_dir / "dopsd" / run / "previews"
    prompt_id = comfy.queue(_toy_workflow_graph(comfy, folders["toy"], run, resume=False))
    deadline = time.time() + 300
    while not (previews.is_dir() and any(p.name != "step_000000.png" for p in previews.glob("step_*.png"))):
        assert time.time() < deadline, "no preview within 300 s"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.5))
    status, _ = comfy.post("/interrupt", {})
    assert status == 200
    entry = comfy.wait(prompt_id)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, entry["status"]
    last_preview = max(int(p.stem.split("_")[1]) for p in previews.glob("step_*.png"))
    state, _, lora_step = run_state(comfy, run)
    assert state["step"] >= last_preview and lora_step == str(state["step"]) and state["step"] < 40
    live = next(r for r in comfy.get("/dopsd/runs")["runs"] if r["run"] == run)
    assert live["status"] == "cancelled" and live["saved_step"] == state["step"], live

    stopped = state
    _ok(comfy, _toy_workflow_graph(comfy, folders["toy"], run, resume=True))
    state, _, lora_step = run_state(comfy, run)
    assert state["step"] == 40 and lora_step == "40" and len(state["history"]) == 40
    assert state["history"][:stopped["step"]] == stopped["history"]  # it went on from the stop step


@pytest.mark.parametrize("family", ("flux2-klein", "z-image"))
def test_cancel_while_the_dataset_is_encoded_leaves_no_cache_entry(comfy, family, request):
    """Cancel after the images are encoded, before the captions and teacher contexts are (Z-Image: the
    Qwen3-VL pass): the prompt stops there and no cache entry exists, whole or half; a re-queue builds it."""
    vlm = request.getfixturevalue("vlm_name") if family == "z-image" else None
    folder = fresh_name(f"dscancel_{family}")
    _write_images(comfy.input_dir / folder, 2, seed=11)
    cache = comfy.output_dir / "dopsd" / "cache"
    before = set(cache.glob("*")) if cache.is_dir() else set()
    nodes = loaders(family, vlm)
    nodes.append((8, "DOPSDTestCancelAfterVAECalls", {"vae": ["3", 0], "calls": 2}))
    nodes.append(dataset_node(folder, family, vae=["8", 0]))
    trainer = {"model": ["1", 0], "dataset": ["5", 0], "steps": 1, "gpu_preset": "family default", "rank": 4,
               "lr": 1e-3, "optimizer": "adamw", "batch_size": 1, "grad_accum": 1, "seed": 0, "checkpointing": False,
               "save_every": 0, "preview_every": 0, "run_name": fresh_name("dscancel"), "resume": False, "k": 2,
               "teacher": "ema", "ema_decay": 0.9, "loss_weight": "x0", "states": "all", "teacher_check": "off"}
    entry = comfy.run(graph(*nodes, (6, "DOPSDTrainer", trainer)))
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, entry["status"]
    assert (set(cache.glob("*")) if cache.is_dir() else set()) == before  # no entry, no temp file

    nodes = loaders(family, vlm) + [dataset_node(folder, family)]
    _ok(comfy, graph(*nodes, (6, "DOPSDTrainer", {**trainer, "run_name": fresh_name("dscancel")})))
    new = set(cache.glob("*.safetensors")) - before
    assert len(new) == 1

"""The trainer node's `tensorboard` toggle, through ComfyUI's real executor: the run folder gets event files
with the step scalars and the preview grids, which TensorBoard's own reader loads."""
import pytest

from comfyui.hostutil import fresh_name, graph, node_error_text

from dopsd_core.toy.render import export_concept_folder


def test_the_trainer_node_writes_tensorboard_logs(comfy):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, run = fresh_name("tb_data"), fresh_name("tb_run")
    export_concept_folder("heart", comfy.input_dir / data, n=3)  # images no other test caches
    entry = comfy.run(graph(
        (1, "DOPSDToyModelLoader", {}),
        (2, "DOPSDDataset", {"model": ["1", 0], "folder": data, "caption_template": "a [V]", "resolution": 32,
                             "toy_text_encoder": ["1", 1]}),
        (3, "DOPSDTrainer", {"model": ["1", 0], "dataset": ["2", 0], "steps": 2, "gpu_preset": "family default",
                             "rank": 4, "lr": 1e-3, "optimizer": "adamw", "batch_size": 2, "grad_accum": 1, "seed": 0,
                             "checkpointing": False, "save_every": 0, "preview_every": 1, "run_name": run,
                             "resume": False, "k": 2, "teacher": "ema", "ema_decay": 0.9, "loss_weight": "x0",
                             "states": "all", "prior_batch": 2, "tensorboard": True})))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    acc = EventAccumulator(str(comfy.output_dir / "dopsd" / run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert {"lr", "grad_norm", "it_per_s", "prior_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("previews")] == [0, 1, 2]  # 0: the starting model

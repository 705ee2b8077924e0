"""DOPSDTrainer / DOPSDSFTTrainer: thin nodes around dopsd_core.hosts.comfy_train.train."""
from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io

from ..dopsd_core import tensorboard_log
from ..dopsd_core.errors import DopsdError, TrainingCancelled
from ..dopsd_core.family_spec import (DEFAULT_PRESET, FAMILY_DEFAULT, PRESET_LABELS, defaults_text, node_config,
                                      spec_named)
from ..dopsd_core.lora import ADAPTERS
from ..dopsd_core.objectives import LOSS_WEIGHTS, STATES, TEACHERS
from ..dopsd_core.optim import OPTIMIZERS
from ..dopsd_core.teacher_check import MODES as TEACHER_CHECK_MODES
from ..dopsd_core.run_folder import is_run_folder, read_run_state
from ..dopsd_core.trainer import Callbacks, TrainConfig
from .dataset import Dataset
from .paths import run_folder_inside

def run_dir_for(run_name: str) -> Path:
    import folder_paths
    return run_folder_inside(run_name, folder_paths.get_output_directory())


def saved_step(run_dir: Path) -> int | None:
    """The step the run folder holds (what a stop kept), or None when nothing was saved."""
    try:
        return int(read_run_state(run_dir)["step"]) if is_run_folder(run_dir) else None
    except (DopsdError, KeyError, ValueError):
        return None


def common_inputs():
    return [
        io.Model.Input("model", tooltip="The step-distilled model to fine-tune."),
        Dataset.Input("dataset", tooltip="From D-OPSD Dataset (built with the same model)."),
        io.Int.Input("steps", default=0, min=0, max=100000,
                     tooltip=f"Total optimizer steps of the run; 0 = the family default ({defaults_text('steps')})."),
        io.Combo.Input("gpu_preset", options=list(PRESET_LABELS), default=DEFAULT_PRESET,
                       tooltip="Rank/optimizer/checkpointing presets for consumer GPUs (FLUX.2-klein, Z-Image); "
                               "they override rank, optimizer and checkpointing."),
        io.Int.Input("rank", default=0, min=0, max=256,
                     tooltip=f"LoRA rank; 0 = the family default ({defaults_text('rank')}; alpha follows)."),
        io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=1e-6,
                       tooltip=f"Learning rate; 0 = the family default ({defaults_text('lr')})."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                       tooltip="adamw8bit needs bitsandbytes (saves optimizer memory on GPUs)."),
        io.Int.Input("batch_size", default=0, min=0, max=64,
                     tooltip=f"Images per micro-batch; 0 = the family default ({defaults_text('batch_size')})."),
        io.Int.Input("grad_accum", default=0, min=0, max=64,
                     tooltip=f"Micro-batches per optimizer step; 0 = the family default "
                             f"({defaults_text('grad_accum')})."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                     tooltip="Seed of noise, sampling and LoRA init (part of the run's config: fixed)."),
        io.Boolean.Input("checkpointing", default=False, tooltip="Per-block gradient checkpointing (less memory)."),
        io.Int.Input("save_every", default=100, min=0, max=100000,
                     tooltip="Atomic save of the run folder every N steps (0 = at the end)."),
        io.Int.Input("preview_every", default=50, min=0, max=100000,
                     tooltip="Few-step preview samples every N steps (0 = none)."),
        io.String.Input("run_name", default="dopsd_run", tooltip="Run folder: output/dopsd/<run_name>."),
        io.Boolean.Input("resume", default=False, tooltip="Continue the run folder of run_name."),
    ]


def make_config(method, dataset, steps, gpu_preset, rank, lr, optimizer, batch_size, grad_accum, seed,
                checkpointing, save_every, preview_every, **dopsd) -> TrainConfig:
    values = dict(method=method, steps=steps, rank=rank, lr=lr, optimizer=optimizer, batch_size=batch_size,
                  grad_accum=grad_accum, seed=seed, checkpointing=checkpointing, save_every=save_every,
                  preview_every=preview_every, **dopsd)
    if not dataset.prior:  # the dataset decides whether there is a prior, the weight how strong
        values["prior_weight"] = 0.0
    return TrainConfig(**node_config(spec_named(dataset.family), gpu_preset, values)).validate()


def _previewer(model):
    """ComfyUI's latent-to-RGB previewer for the model's latent format (None if it has no factors)."""
    from latent_preview import Latent2RGBPreviewer
    fmt = model.model.latent_format
    if getattr(fmt, "latent_rgb_factors", None) is None:
        return None
    return Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias,
                               getattr(fmt, "latent_rgb_factors_reshape", None))


def late_inputs():
    """Appended last and optional, so API graphs and workflows saved before them keep working."""
    return [io.Boolean.Input("offload", default=False, optional=True,
                             tooltip="Low VRAM: ComfyUI's own partial loading (as its Train LoRA node does): "
                                     "blocks that do not fit stay in RAM and are moved to the GPU for each "
                                     "forward. Slower; combine with checkpointing. The toy model and CPU runs "
                                     "ignore it."),
            io.Float.Input("prior_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                           tooltip="Prior preservation (lambda): keeps what the model did on the dataset's "
                                   "prior_prompts. D-OPSD: an extra roll-out per step pulled toward the starting "
                                   "model; SFT: class images it generates once. 0 = off; a dataset without prior "
                                   "prompts has none either way."),
            io.Int.Input("prior_batch", default=0, min=0, max=64, optional=True,
                         tooltip=f"Prior roll-outs (SFT: class images) per micro-batch; 0 = the family default "
                                 f"({defaults_text('prior_batch')})."),
            io.Combo.Input("init_lora", options=[NO_LORA] + _lora_names(), default=NO_LORA, optional=True,
                           tooltip="Continue from a LoRA in models/loras (as ComfyUI's Train LoRA's existing_lora): "
                                   "a new run whose student, EMA teacher and prior anchor start from it. Its "
                                   "concepts stay in the new LoRA's metadata; to keep them, put their captions in "
                                   "the dataset's prior_prompts. A resumed run keeps the LoRA it started from."),
            io.Combo.Input("teacher_check", options=list(TEACHER_CHECK_MODES), default="warn", optional=True,
                           tooltip="Before a new run's first step, check that the teacher (the model with the "
                                   "target in context) draws a few training images: warn shows the result on the "
                                   "node and goes on, stop refuses to train when it does not, off skips it."),
            io.Boolean.Input("tensorboard", default=False, optional=True,
                             tooltip="Also write TensorBoard logs (loss, prior loss, lr, grad norm, it/s, previews) "
                                     "to output/dopsd/<run_name>/tensorboard (needs: pip install tensorboard)."),
            io.Combo.Input("adapter", options=list(ADAPTERS), default="lora", optional=True,
                           tooltip="What is trained: lora, lokr or loha (LyCORIS layouts; the stock LoRA loaders "
                                   "apply all three). rank is the low-rank size of each."),
            io.Int.Input("lokr_factor", default=-1, min=-1, max=256, optional=True,
                         tooltip="LoKr only: split each layer dimension as factor x rest; -1 = as near the square "
                                 "root as divisors allow.")]


NO_LORA = "[none]"


def _lora_names() -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list("loras")


def init_lora_path(name: str | None) -> Path | None:
    """The LoRA file a name from models/loras refers to (names only, as the stock loaders resolve them)."""
    if not name or name == NO_LORA:
        return None
    import folder_paths
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise DopsdError(f"init_lora {name!r} is not in models/loras; pick a listed LoRA or {NO_LORA}")
    return Path(path)


def run_training(cls, model, dataset, run_name, resume, cfg: TrainConfig, offload: bool = False,
                 init_lora: str | None = None, tensorboard: bool = False, teacher_check: str = "warn"):
    import comfy.model_management as mm
    import comfy.utils
    from server import PromptServer

    from ..dopsd_core.hosts.comfy_train import train
    from . import live
    node_id = cls.hidden.unique_id
    run_dir = run_dir_for(run_name)
    if resume and not is_run_folder(run_dir):
        raise DopsdError(f"resume is on but {run_dir} is not a run folder; turn resume off to start it")
    pbar = comfy.utils.ProgressBar(cfg.steps, node_id=node_id)
    server = PromptServer.instance

    def on_step(info):
        pbar.update_absolute(info.step, info.total)
        text = f"step {info.step}/{info.total}  loss {info.loss:.4g}  {info.it_per_s:.2f} it/s  ETA {info.eta_s:.0f}s"
        server.send_progress_text(text, node_id)
        live.run_step(node_id, run_id, info.step, info.total, info.loss, info.lr, info.it_per_s, info.eta_s,
                      info.prior_loss)

    previewer = _previewer(model)

    def on_preview(step, latents, _prompts):
        """Few-step student samples: into the run folder and onto the node's progress preview."""
        if previewer is None:
            return
        from ..dopsd_core.plot import save_png
        tiles = [previewer.decode_latent_to_preview(lat[None].float().cpu()) for lat in latents]
        w, h = tiles[0].size
        scale = max(1, 128 // max(w, h))
        from PIL import Image
        grid = Image.new("RGB", (len(tiles) * w * scale, h * scale))
        for i, tile in enumerate(tiles):
            grid.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, 0))
        png = run_dir / "previews" / f"step_{step:06d}.png"
        save_png(grid, png)
        if tb:
            import numpy as np
            tb.preview(step, torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None])
        pbar.update_absolute(step, cfg.steps, ("JPEG", grid, 512))
        live.run_preview(node_id, run_id, step, png)

    callbacks = Callbacks(on_step=on_step, on_preview=on_preview, should_stop=mm.processing_interrupted)
    tb = None
    if tensorboard:
        tb = tensorboard_log.open_log("tensorboard", run_dir, (saved_step(run_dir) or 0) if resume else 0)
        callbacks.on_step = tensorboard_log.chain(on_step, tb.step)
    run_id = live.run_started(node_id, run_name, cfg.method, cfg.steps)
    start_png = run_dir / "previews" / "step_000000.png"
    if resume and start_png.is_file():  # a resumed run shows the start its first part drew
        live.run_preview(node_id, run_id, 0, start_png)
    status = "error"
    try:
        def on_teacher_check(report):
            server.send_progress_text(report.summary(), node_id)
            live.run_note(node_id, run_id, report.summary(), ok=report.passed)
        patched, lora_sd, history = train(model, dataset, cfg, run_dir, callbacks, resume=resume, offload=offload,
                                          init_lora=None if resume else init_lora_path(init_lora),
                                          teacher_check=teacher_check, on_teacher_check=on_teacher_check)
        status = "finished"
    except TrainingCancelled:  # Cancel seen between steps: the trainer saved the step it stopped at
        status = "cancelled"
        mm.throw_exception_if_processing_interrupted()  # ComfyUI reports the run as interrupted
        raise
    except mm.InterruptProcessingException:  # Cancel raised inside a step or a callback: the trainer
        status = "cancelled"                  # saved the last complete step
        raise
    finally:
        if tb:
            tb.close()
        live.run_finished(node_id, run_id, status, saved_step(run_dir))
    return io.NodeOutput(patched, lora_sd, {"loss": history})


class DOPSDTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTrainer", display_name="D-OPSD Trainer", category="D-OPSD", is_output_node=True,
            description="Trains a LoRA by on-policy self-distillation: the model with the target image in "
                        "context teaches the model without it, on the model's own few-step trajectory.",
            inputs=common_inputs() + [
                io.Int.Input("k", default=4, min=1, max=16, tooltip="Roll-out steps K (the few-step grid)."),
                io.Combo.Input("teacher", options=list(TEACHERS), default="ema",
                               tooltip="Teacher weights: EMA of the student LoRA, or the frozen base."),
                io.Float.Input("ema_decay", default=0.9999, min=0.0, max=0.999999, step=1e-5,
                               tooltip="EMA decay of the teacher LoRA."),
                io.Combo.Input("loss_weight", options=list(LOSS_WEIGHTS), default="x0",
                               tooltip="Per-state weight: x0 MSE (default), velocity MSE, or transition."),
                io.Combo.Input("states", options=[FAMILY_DEFAULT, *STATES], default=FAMILY_DEFAULT,
                               tooltip=f"Supervised roll-out states: all K, or one or two drawn at random "
                                       f"(cheaper); {FAMILY_DEFAULT}: {defaults_text('states')}."),
                *late_inputs(),
                io.Int.Input("prior_every", default=0, min=0, max=64, optional=True,
                             tooltip=f"The prior term on every N-th step only, weighted N times (cheaper); 0 = the "
                                     f"family default ({defaults_text('prior_every')})."),
                io.Combo.Input("prior_states", options=[FAMILY_DEFAULT, "same", *STATES], default=FAMILY_DEFAULT,
                               optional=True,
                               tooltip=f"Supervised states of the prior's roll-outs; same = as states; "
                                       f"{FAMILY_DEFAULT}: {defaults_text('prior_states')}."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.LoraModel.Output(display_name="LORA"),
                     io.LossMap.Output(display_name="LOSS")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, dataset, steps, gpu_preset, rank, lr, optimizer, batch_size, grad_accum, seed,
                checkpointing, save_every, preview_every, run_name, resume, k, teacher, ema_decay, loss_weight,
                states, offload=False, prior_weight=1.0, prior_batch=0, init_lora=NO_LORA, tensorboard=False,
                teacher_check="warn", adapter="lora", lokr_factor=-1, prior_every=0, prior_states=FAMILY_DEFAULT):
        cfg = make_config("dopsd", dataset, steps, gpu_preset, rank, lr, optimizer, batch_size, grad_accum, seed,
                          checkpointing, save_every, preview_every, k=k, teacher=teacher, ema_decay=ema_decay,
                          loss_weight=loss_weight, states=states, prior_weight=prior_weight, prior_batch=prior_batch,
                          adapter=adapter, lokr_factor=lokr_factor, prior_every=prior_every,
                          prior_states=prior_states)
        return run_training(cls, model, dataset, run_name, resume, cfg, offload, init_lora, tensorboard, teacher_check)


class DOPSDSFTTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDSFTTrainer", display_name="D-OPSD SFT Trainer (baseline)", category="D-OPSD",
            is_output_node=True,
            description="The baseline: the same LoRA trained with flow matching on the images.",
            inputs=common_inputs() + late_inputs(),
            outputs=[io.Model.Output(display_name="MODEL"), io.LoraModel.Output(display_name="LORA"),
                     io.LossMap.Output(display_name="LOSS")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, dataset, steps, gpu_preset, rank, lr, optimizer, batch_size, grad_accum, seed,
                checkpointing, save_every, preview_every, run_name, resume, offload=False, prior_weight=1.0,
                prior_batch=0, init_lora=NO_LORA, tensorboard=False,
                teacher_check="warn", adapter="lora", lokr_factor=-1):
        cfg = make_config("sft", dataset, steps, gpu_preset, rank, lr, optimizer, batch_size, grad_accum, seed,
                          checkpointing, save_every, preview_every, prior_weight=prior_weight, prior_batch=prior_batch,
                          adapter=adapter, lokr_factor=lokr_factor)
        return run_training(cls, model, dataset, run_name, resume, cfg, offload, init_lora, tensorboard, teacher_check)


NODES = [DOPSDTrainer, DOPSDSFTTrainer]

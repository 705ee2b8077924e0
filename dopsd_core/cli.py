"""`dopsd` command line: train and sample; the toy package registers the toy world's commands.

Bad input prints one line naming the problem and the fix and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from . import distributed, tensorboard_log
from .teacher_check import MODES as TEACHER_CHECK_MODES
from .tensorboard_log import LOG_WITH
from .errors import DopsdError, NonFiniteLoss, TrainingCancelled
from .family_spec import DEFAULT_PRESET, NAMES, PRESET_LABELS, TOY, defaults_text, spec_named
from .progress import ProgressBar, StopOnSignal



class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage by default)
        raise DopsdError(f"{message} (see `{self.prog} --help`)")


ALIASES = {"klein": "flux2-klein", "zimage": "z-image"}


def model_name(value: str) -> str:
    """--model: a family spec's name, or its short alias (klein, zimage)."""
    name = ALIASES.get(value, value)
    if name not in NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; pick one of {', '.join(NAMES)} (or klein, zimage)")
    return name


def add_model_arguments(p, with_training: bool = False) -> None:
    """--model, the toy's weights, and the ComfyUI files of the families run headless."""
    p.add_argument("--model", type=model_name, help="base model: toy (the default for a new run), flux2-klein "
                   "(klein) or z-image (zimage); a resumed run keeps its own")
    p.add_argument("--weights", help="toy weights file (default: the shipped toy base)")
    g = p.add_argument_group("FLUX.2-klein and Z-Image-Turbo, through ComfyUI as a library (no server)")
    g.add_argument("--comfyui", metavar="PATH", help="the ComfyUI folder (with main.py and models/); default "
                   "$COMFYUI_PATH")
    g.add_argument("--diffusion-model", metavar="FILE", help="a file in models/diffusion_models (or a path), as "
                   "UNETLoader lists it")
    g.add_argument("--text-encoder", metavar="FILE", help="its Qwen3 file in models/text_encoders (or a path)")
    g.add_argument("--vae", metavar="FILE", help="its VAE in models/vae (or a path)")
    g.add_argument("--weight-dtype", choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
                   help="UNETLoader's weight_dtype (default: as stored)")
    g.add_argument("--text-encoder-dtype", choices=("default", "fp8_e4m3fn", "fp8_e5m2"),
                   help="store the text encoder in fp8, as ComfyUI's --fp8_e4m3fn-text-enc (default: as stored)")
    g.add_argument("--vlm", metavar="FOLDER", help="Z-Image: the Qwen3-VL-4B-Instruct folder of the teacher (a path "
                   "or its name in models/dopsd_vlm)")
    g.add_argument("--vlm-dtype", choices=("auto", "bf16", "fp16", "fp32"), help="Z-Image: Qwen3-VL precision "
                   "while it encodes (default auto: bf16 on a GPU, fp32 on the CPU)")
    if with_training:
        g.add_argument("--resolution", type=int, help="training resolution, about resolution² pixels per image "
                       "(default: the family's, 1024)")
        g.add_argument("--no-aspect-buckets", dest="aspect_buckets", action="store_false", default=None,
                       help="centre-crop every image to a square (default: keep aspect ratios in buckets)")
        g.add_argument("--gpu-preset", choices=PRESET_KEYS, help="a consumer-GPU preset: " + "; ".join(
            f"{k}: {label}" for k, label in PRESET_KEYS.items()) + " (flags given override it)")
        g.add_argument("--offload", action="store_true", help="low VRAM: ComfyUI's partial loading, blocks that do "
                       "not fit stay in RAM")


PRESET_KEYS = {label.split(" (")[0].lower().replace(" ", ""): label for label in PRESET_LABELS
               if label != DEFAULT_PRESET}  # "12gb", "16-24gb"


def load_model(name: str, weights: str | None = None):
    from .toy.denoiser import load_toy
    return load_toy(weights=Path(weights) if weights else None)


def train_defaults(model: str, method: str = "dopsd") -> dict:
    """A new run's config defaults per model and method (flags override them): the family spec's."""
    return spec_named(model).train_defaults(method)


def add_train_parser(sub) -> None:
    from .lora import ADAPTERS
    from .objectives import LOSS_WEIGHTS, STATES, TEACHERS
    from .optim import OPTIMIZERS, SCHEDULES
    from .trainer import METHODS, TrainConfig
    p = sub.add_parser("train", help="train a LoRA with D-OPSD or the SFT baseline")
    d = TrainConfig(**train_defaults(TOY.name))
    p.add_argument("--method", choices=METHODS, help=f"objective (default {d.method})")
    add_model_arguments(p, with_training=True)
    p.add_argument("--data", help="folder of images with same-name .txt captions")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder (unset flags keep its values)")
    p.add_argument("--init-lora", metavar="FILE", help="start a new run from this LoRA (teacher EMA starts from it)")
    p.add_argument("--steps", type=int, help=f"total optimizer steps of the run (default {defaults_text('steps')})")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {defaults_text('rank')})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default {defaults_text('alpha')}; with --rank on a "
                   "photo family: alpha = rank)")
    p.add_argument("--adapter", choices=ADAPTERS, help="what is trained: lora (the default), lokr or loha (LyCORIS "
                   "layouts that ComfyUI's stock LoRA loaders apply)")
    p.add_argument("--lokr-factor", type=int, help="LoKr: split each dimension as factor x rest (default -1: as "
                   "near the square root as divisors allow)")
    p.add_argument("--lr", type=float, help=f"learning rate (default {defaults_text('lr')})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"LR schedule (default {d.schedule})")
    p.add_argument("--warmup", type=int, help=f"LR warm-up steps (default {d.warmup})")
    p.add_argument("--k", type=int, help=f"roll-out steps K of D-OPSD (default {d.k})")
    p.add_argument("--teacher", choices=TEACHERS, help=f"teacher weights (default {d.teacher})")
    p.add_argument("--ema-decay", type=float, help=f"EMA teacher decay (default {d.ema_decay})")
    p.add_argument("--loss-weight", choices=LOSS_WEIGHTS, help=f"(default {d.loss_weight})")
    p.add_argument("--states", choices=STATES, help=f"D-OPSD: supervised roll-out states, all K or one/two drawn at random "
                   f"(fewer: cheaper; default {defaults_text('states')})")
    p.add_argument("--batch-size", type=int, help=f"(default {defaults_text('batch_size')})")
    p.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (default {defaults_text('grad_accum')})")
    p.add_argument("--save-every", type=int, help="save the run folder every N steps (default: at the end)")
    p.add_argument("--preview-every", type=int, help="write preview samples every N steps (default: never); step 0 "
                   "shows the starting model on the same noise")
    p.add_argument("--sample-prompts", metavar="FILE", help="the previews' prompts, one per line (default: two with "
                   "the concept in new settings and two unrelated prompts that must not change)")
    p.add_argument("--checkpointing", action="store_true", default=None, help="per-block gradient checkpointing")
    p.add_argument("--teacher-check", choices=TEACHER_CHECK_MODES, default="warn",
                   help="before a new run's first step, check that the teacher draws a few training images "
                        "(warn: report and go on, the default; stop: stop if it does not; off)")
    p.add_argument("--log-with", choices=LOG_WITH, default="none",
                   help="also log scalars and previews for TensorBoard under RUN_DIR/tensorboard (needs the "
                        "tensorboard package); loss.csv and loss.png are written either way")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the denoiser (20-35 s compile per graph; pays off only on long runs)")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g = p.add_argument_group("prior preservation (keep what the model could do before)")
    g.add_argument("--prior-prompts", metavar="FILE|auto|none",
                   help="prompts whose behaviour the run keeps: a text file (one per line, <empty> for the empty "
                        "prompt), auto (the default for a new run: the captions with the trigger replaced by "
                        "--class-word or removed, the empty prompt, the concepts of an --init-lora, and the model's "
                        "generic prompts) or none (no prior preservation)")
    g.add_argument("--prior-weight", type=float,
                   help="lambda of the prior term (default 1; 0 with --prior-prompts none)")
    g.add_argument("--prior-batch", type=int, help=f"prior roll-outs (SFT: class images) per step (default "
                   f"{defaults_text('prior_batch')})")
    g.add_argument("--prior-every", type=int, help="D-OPSD: the prior term on every N-th step only, weighted N "
                   f"times (cheaper; default {defaults_text('prior_every')})")
    g.add_argument("--prior-states", choices=("same", *STATES), help="D-OPSD: supervised states of the prior's "
                   f"roll-outs, same = as --states (default {defaults_text('prior_states')})")
    g.add_argument("--trigger", help="the word in the captions that names the concept (default: their bracket token, e.g. [V])")
    g.add_argument("--class-word", help="what auto puts where the trigger was (default: nothing)")
    p.set_defaults(func=cmd_train)


CONFIG_FLAGS = ("method", "steps", "rank", "alpha", "adapter", "lokr_factor", "lr", "optimizer", "schedule", "warmup", "k", "teacher",
                "ema_decay", "loss_weight", "states", "batch_size", "grad_accum", "save_every", "preview_every",
                "checkpointing", "compile", "seed", "prior_weight", "prior_batch", "prior_every", "prior_states")


def cmd_train(args) -> int:
    from . import run_folder
    from .run_folder import read_run_state
    from .trainer import Callbacks, TrainConfig

    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    # the prior is on by default for a new run (the toy study: it keeps most of what the base could do);
    # a resumed run keeps the prompts it started with
    prior_mode = args.prior_prompts or (None if args.resume else "auto")
    if prior_mode == "none":
        prior_mode = None
    prior_captions = None
    if args.resume:
        run_dir = Path(args.resume)
        state = read_run_state(run_dir)
        model = state.get("model_family", TOY.name)
        if args.model and args.model != model:
            raise DopsdError(f"{run_dir} is a {model} run; drop --model {args.model} or start a new --out")
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise DopsdError("--resume continues in its own folder; drop --out or pass the same folder")
        if args.init_lora:
            raise DopsdError("--init-lora starts a new run; it cannot be combined with --resume")
        if args.gpu_preset:
            raise DopsdError("--gpu-preset sets up a new run; a resumed run keeps its settings (flags change them)")
        base = state["config"]
        data = args.data or state.get("data_dir")
        prior_captions = state.get("prior_prompts")  # unless --prior-prompts names others (then refused)
    else:
        if not args.out:
            raise DopsdError("--out is required: the run folder to create (e.g. --out runs/my_concept)")
        model = args.model or TOY.name
        spec = spec_named(model)
        if args.gpu_preset and spec is TOY:
            raise DopsdError("--gpu-preset is for FLUX.2-klein and Z-Image-Turbo; the toy runs on any CPU")
        run_dir, data = Path(args.out), args.data
        run_folder.refuse_taken_out_dir(run_dir)  # before any model or data is read (full-size loads take minutes)
        preset = spec.preset(PRESET_KEYS[args.gpu_preset] if args.gpu_preset else DEFAULT_PRESET)
        base = {**train_defaults(model, given.get("method", "dopsd")), **preset}
    if args.prior_weight is None and not args.resume:  # the family's lambda with a prior, 0 without
        given["prior_weight"] = spec_named(model).prior_weight if prior_mode else 0.0
    elif prior_mode and args.prior_weight is None:
        given["prior_weight"] = spec_named(model).prior_weight
    if "rank" in given and "alpha" not in given and not args.resume and spec_named(model) is not TOY:
        given["alpha"] = float(given["rank"])  # as the trainer nodes: an explicit rank sets alpha = rank
    cfg = TrainConfig(**{**base, **given}).validate()
    if not data:
        raise DopsdError("--data is required: a folder of images with same-name .txt captions")

    tensorboard_log.require(args.log_with)
    dist = distributed.from_env()  # torchrun: this process's rank; a plain run: rank 0 of 1
    main = dist.is_main
    bar = ProgressBar(cfg.steps)
    stop = StopOnSignal(announce=main)
    callbacks = Callbacks(on_step=bar.update if main else None, should_stop=stop.requested)
    tb = session = None
    try:
        if model == TOY.name:
            session = _ToyTraining(args, cfg, run_dir, data, prior_mode, prior_captions, callbacks, dist)
        else:
            from .hosts.headless import FamilyTraining  # ComfyUI, imported only for its families
            session = FamilyTraining(args, model, cfg, run_dir, data, prior_captions, callbacks, dist,
                                     prior_prompts=lambda captions, trigger: _prior_prompts(
                                         args, model, prior_mode, captions, trigger) if prior_mode else None,
                                     sample_prompts=lambda captions, trigger: sample_prompts(args, model, captions,
                                                                                             trigger))
        if args.resume and main:
            print(f"resuming {run_dir} at step {session.start_step}/{cfg.steps}", file=sys.stderr)
        tb = tensorboard_log.open_log(args.log_with, run_dir, session.start_step) if main else None
        if tb:
            callbacks.on_step = tensorboard_log.chain(callbacks.on_step, tb.step)
            callbacks.on_preview = tensorboard_log.chain(callbacks.on_preview, lambda step, images, _: tb.preview(step, images))
        if dist.world > 1 and main:
            print(f"data parallel: {dist.world} processes, {cfg.batch_size // dist.world} of the batch of "
                  f"{cfg.batch_size} each", file=sys.stderr)
        with stop:
            steps_done = session.run()
    except TrainingCancelled as e:
        if main:
            print(f"\n{stop.name or 'another process'}: stopped at step {e.step}; {run_dir} keeps it. Continue with: "
                  f"dopsd train --resume {run_dir} --steps {cfg.steps}", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)
    except (DopsdError, NonFiniteLoss):
        raise
    except BaseException as e:  # an error inside a step (e.g. out of memory): the trainer kept the step before
        if main:
            kept = _kept_step(run_dir)
            kept = f"{run_dir} keeps step {kept}" if kept is not None else "nothing was saved"
            during = f"step {session.current_step + 1}" if session is not None else "loading"
            print(f"\n{type(e).__name__} during {during}; {kept}. Continue with: "
                  f"dopsd train --resume {run_dir} --steps {cfg.steps}", file=sys.stderr)
        raise
    finally:
        if tb:
            tb.close()
        distributed.shutdown(dist)
    if main:
        print(f"trained {steps_done} steps; LoRA: {run_dir / 'lora.safetensors'}  loss curve: "
              f"{run_dir / 'loss.png'}")
    return 0


def _kept_step(run_dir: Path) -> int | None:
    from .run_folder import is_run_folder, read_run_state
    try:
        return int(read_run_state(run_dir)["step"]) if is_run_folder(run_dir) else None
    except (DopsdError, KeyError, ValueError):
        return None


class _ToyTraining:
    """The toy's run: its own text encoder and denoiser, records from the folder."""

    def __init__(self, args, cfg, run_dir: Path, data, prior_mode, prior_captions, callbacks, dist):
        from .data import load_image_folder
        from .plot import image_grid, save_png
        from .prior import Prior, trigger_or_none
        from .trainer import Trainer
        den = load_model(TOY.name, args.weights)
        records = den.build_records(load_image_folder(Path(data), den.resolution))
        captions = [c for r in records for c in r.captions]
        trigger = args.trigger or trigger_or_none(captions)
        if prior_mode:
            prior_captions = _prior_prompts(args, TOY.name, prior_mode, captions, trigger)
        prior = Prior(prior_captions, [den.encode_prompt(p) for p in prior_captions]) if prior_captions else None

        def on_preview(step, images, _prompts):
            save_png(image_grid([images], scale=4), run_dir / "previews" / f"step_{step:06d}.png")
        if dist.is_main:
            callbacks.on_preview = on_preview
        samples = sample_prompts(args, TOY.name, captions, trigger)
        self.trainer = Trainer(den, records, cfg, run_dir, callbacks, preview_prompts=samples,
                               init_lora=args.init_lora, resume=bool(args.resume), data_dir=str(Path(data).resolve()),
                               prior=prior, trigger=trigger, dist=dist)
        if not args.resume and args.teacher_check != "off":  # every rank: none waits on rank 0's check
            _preflight_teacher_check(den, records, cfg, run_dir, args, dist.is_main)
        self.start_step = self.trainer.step

    @property
    def current_step(self) -> int:
        return self.trainer.step

    def run(self) -> int:
        return self.trainer.run().steps_done


def _preflight_teacher_check(den, records, cfg, run_dir: Path, args, main: bool = True) -> None:
    """The teacher check (teacher_check.py) before the first step: logged and written to the run folder by
    rank 0, and a stop (on every rank) when asked for."""
    from .fileio import save_json
    from .teacher_check import check_teacher, toy_judge
    toy = args.model == TOY.name
    report = check_teacher(den, records, cfg.k, seed=cfg.seed, judge=toy_judge() if toy else None,
                           decode=den.decode if toy else None)
    if main:
        save_json(report.to_dict(), run_dir / "teacher_check.json")
        print(report.summary(), file=sys.stderr)
    if not report.passed and args.teacher_check == "stop":
        raise DopsdError(f"--teacher-check stop: {report.advice} (report: {run_dir / 'teacher_check.json'})")


def _prior_prompts(args, model: str, mode: str, captions: list[str], trigger: str | None) -> list[str]:
    from .prior import auto_prior_prompts, earlier_concepts, read_prompt_file
    if mode != "auto":
        return read_prompt_file(Path(mode))
    earlier = []
    if args.init_lora:
        from .lora import read_lora_file
        earlier = earlier_concepts(read_lora_file(Path(args.init_lora))[1])
    return auto_prior_prompts(captions, trigger, args.class_word, generic_prompts(model), earlier)


def sample_prompts(args, model: str, captions: list[str], trigger: str | None) -> list[str]:
    """--sample-prompts FILE, or the family's defaults (family_spec.FamilySpec.sample_prompts)."""
    from .prior import read_prompt_file
    if args.sample_prompts:
        return read_prompt_file(Path(args.sample_prompts), what="sample prompt")
    return spec_named(model).sample_prompts(captions, trigger)


def generic_prompts(model: str) -> list[str]:
    """The model family's built-in generic prompts for --prior-prompts auto."""
    return spec_named(model).prompts_for_prior()


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="few-step samples from the model (optionally with a LoRA)")
    add_model_arguments(p)
    p.add_argument("--lora", help="LoRA .safetensors to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, help="sampling steps (default: the family's few-step setting, 4)")
    p.add_argument("--n", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--width", type=int, help="image width (default: the family's resolution; the toy: 32)")
    p.add_argument("--height", type=int, help="image height (default: the family's resolution; the toy: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.set_defaults(func=cmd_sample)


def _sampling_model(args, lora: str | None):
    """Checks --steps, --n and --out, loads the model and applies the LoRA file if one is given."""
    from .lora import lora_file_spec, read_lora_file
    args.model = args.model or TOY.name
    args.steps = args.steps or spec_named(args.model).sample_steps
    if args.steps < 1 or args.n < 1:
        raise DopsdError("--steps and --n must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DopsdError(f"output path {out} is a file; pass a folder for --out")
    den = load_model(args.model, args.weights)
    if lora:
        sd, meta = read_lora_file(Path(lora))
        spec = lora_file_spec(meta, sd)
        den.add_lora(spec["rank"], spec["alpha"], adapter=spec["adapter"], factor=spec["factor"]).load_state_dict_comfy(
            sd, source=lora)
    return den, out


def cmd_sample(args) -> int:
    import torch

    from .denoiser import sample
    from .plot import save_png, to_pil

    if (args.model or TOY.name) != TOY.name:
        from .hosts.headless import sample_command
        return sample_command(args)
    den, out = _sampling_model(args, args.lora)
    ctx = den.batch_contexts([den.encode_prompt(args.prompt)] * args.n)
    latents = sample(den, ctx, (args.n, *den.latent_shape), den.sigma_grid(args.steps, den.latent_shape),
                     torch.Generator().manual_seed(args.seed))
    images = den.decode(latents)
    for i, img in enumerate(images):
        save_png(to_pil(img), out / f"sample_{i:03d}.png")
    print(f"wrote {args.n} samples to {out}")
    return 0


def add_preview_teacher_parser(sub) -> None:
    p = sub.add_parser("preview-teacher", help="the teacher's few-step samples per training image and caption, "
                                               "before training (D-OPSD cannot teach more than its teacher shows)")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="folder of images with same-name .txt captions")
    p.add_argument("--init-lora", metavar="FILE", help="preview a warm start's teacher (the base with this LoRA)")
    p.add_argument("--resolution", type=int, help="image size, about resolution² pixels (default: the family's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the family's few-step setting, 4)")
    p.add_argument("--n", type=int, default=4, help="samples per image and caption (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for one PNG per image (target, then samples) and report.json")
    p.set_defaults(func=cmd_preview_teacher)


def cmd_preview_teacher(args) -> int:
    import torch

    from .data import load_image_folder
    from .denoiser import sample
    from .teacher_check import write_teacher_preview

    if (args.model or TOY.name) != TOY.name:
        from .hosts.headless import preview_teacher_command
        return preview_teacher_command(args)
    den, out = _sampling_model(args, args.init_lora)
    records = den.build_records(load_image_folder(Path(args.data), den.resolution))

    def per_image():
        for r in records:
            target = den.decode(r.x0[None])  # [1, H, W, 3]
            rows = []
            for caption, ctx in zip(r.captions, r.teacher_ctx):
                lat = sample(den, den.batch_contexts([ctx] * args.n), (args.n, *r.x0.shape),
                             den.sigma_grid(args.steps, tuple(r.x0.shape)), torch.Generator().manual_seed(args.seed),
                             device=r.x0.device)
                rows.append((caption, target, den.decode(lat)))
            yield r.name, rows
    write_teacher_preview(per_image(), args.n, out, _toy_verdict())
    return 0


def _toy_verdict():
    """The toy evaluator's shape counts (its 9 shapes: 6 seen, 3 held out) for a batch of images."""
    from collections import Counter

    from .toy.evaluator import load_evaluator
    ev = load_evaluator()

    def verdict(images) -> dict[str, int]:
        shapes, _ = ev.classify(images.permute(0, 3, 1, 2))
        return dict(Counter(shapes).most_common())
    return verdict


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dopsd", description="D-OPSD LoRA training for step-distilled flow models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_preview_teacher_parser(sub)
    from .toy.cli import add_toy_parsers  # the toy world's commands: toy-data, demo
    add_toy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="dopsd: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DopsdError as e:
        print(f"dopsd: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"dopsd: {e}", file=sys.stderr)
        return 1

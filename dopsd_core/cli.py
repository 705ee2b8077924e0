"""`dopsd` command line: train, sample (and the toy world's commands).

Bad input prints one line naming the problem and the fix and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import DopsdError, NonFiniteLoss

MODELS = ("toy",)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage by default)
        raise DopsdError(f"{message} (see `{self.prog} --help`)")


class ProgressBar:
    """A terminal progress bar with loss and ETA; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.every = max(1, total // 20)

    def update(self, info) -> None:
        width = 24
        filled = int(width * info.step / info.total)
        eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, info.eta_s)))
        line = (f"[{'#' * filled}{'-' * (width - filled)}] {info.step}/{info.total} loss {info.loss:.4g} "
                f"lr {info.lr:.2g} {info.it_per_s:.2f} it/s ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if info.step == info.total else ""))
            self.stream.flush()
        elif info.step % self.every == 0 or info.step == info.total:
            self.stream.write(line + "\n")


def load_model(name: str, weights: str | None = None):
    if name == "toy":
        from .toy.denoiser import load_toy
        return load_toy(weights=Path(weights) if weights else None)
    raise DopsdError(f"unknown model {name!r}; the CLI knows {', '.join(MODELS)} (real families train in ComfyUI)")


def add_train_parser(sub) -> None:
    from .trainer import TrainConfig
    p = sub.add_parser("train", help="train a LoRA with D-OPSD or the SFT baseline")
    d = TrainConfig()
    p.add_argument("--method", choices=["dopsd", "sft"], help=f"objective (default {d.method})")
    p.add_argument("--model", choices=MODELS, default="toy", help="base model (default toy)")
    p.add_argument("--weights", help="toy weights file (default: the shipped toy base)")
    p.add_argument("--data", help="folder of images with same-name .txt captions")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder (unset flags keep its values)")
    p.add_argument("--init-lora", metavar="FILE", help="start a new run from this LoRA (teacher EMA starts from it)")
    p.add_argument("--steps", type=int, help=f"total optimizer steps of the run (default {d.steps})")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], help=f"optimizer (default {d.optimizer})")
    p.add_argument("--schedule", choices=["constant", "cosine"], help=f"LR schedule (default {d.schedule})")
    p.add_argument("--warmup", type=int, help=f"LR warm-up steps (default {d.warmup})")
    p.add_argument("--k", type=int, help=f"roll-out steps K of D-OPSD (default {d.k})")
    p.add_argument("--teacher", choices=["ema", "frozen"], help=f"teacher weights (default {d.teacher})")
    p.add_argument("--ema-decay", type=float, help=f"EMA teacher decay (default {d.ema_decay})")
    p.add_argument("--loss-weight", choices=["x0", "velocity", "transition"], help=f"(default {d.loss_weight})")
    p.add_argument("--states", choices=["all", "one"], help=f"supervised roll-out states (default {d.states})")
    p.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (default {d.grad_accum})")
    p.add_argument("--save-every", type=int, help="save the run folder every N steps (default: at the end)")
    p.add_argument("--preview-every", type=int, help="write preview samples every N steps (default: never)")
    p.add_argument("--checkpointing", action="store_true", default=None, help="per-block gradient checkpointing")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the denoiser (20-35 s compile per graph; pays off only on long runs)")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.set_defaults(func=cmd_train)


CONFIG_FLAGS = ("method", "steps", "rank", "alpha", "lr", "optimizer", "schedule", "warmup", "k", "teacher",
                "ema_decay", "loss_weight", "states", "batch_size", "grad_accum", "save_every", "preview_every",
                "checkpointing", "compile", "seed")


def cmd_train(args) -> int:
    from .data import load_image_folder
    from .plot import image_grid, save_png
    from .trainer import Callbacks, TrainConfig, Trainer, read_run_state

    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.resume:
        run_dir = Path(args.resume)
        state = read_run_state(run_dir)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise DopsdError("--resume continues in its own folder; drop --out or pass the same folder")
        if args.init_lora:
            raise DopsdError("--init-lora starts a new run; it cannot be combined with --resume")
        cfg = TrainConfig(**{**state["config"], **given})
        data = args.data or state.get("data_dir")
    else:
        if not args.out:
            raise DopsdError("--out is required: the run folder to create (e.g. --out runs/my_concept)")
        run_dir, cfg, data = Path(args.out), TrainConfig(**given), args.data
    cfg.validate()
    if not data:
        raise DopsdError("--data is required: a folder of images with same-name .txt captions")
    den = load_model(args.model, args.weights)
    records = den.build_records(load_image_folder(Path(data), den.resolution))
    prompts = [r.captions[0] for r in records[:4]]

    def on_preview(step, images, _prompts):
        save_png(image_grid([images], scale=4), run_dir / "previews" / f"step_{step:06d}.png")

    bar = ProgressBar(cfg.steps)
    trainer = Trainer(den, records, cfg, run_dir, Callbacks(on_step=bar.update, on_preview=on_preview),
                      preview_prompts=prompts, init_lora=args.init_lora, resume=bool(args.resume),
                      data_dir=str(Path(data).resolve()))
    if args.resume:
        print(f"resuming {run_dir} at step {trainer.step}/{cfg.steps}", file=sys.stderr)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.step}; {run_dir} keeps step {trainer.last_saved}", file=sys.stderr)
        return 130
    print(f"trained {result.steps_done} steps; LoRA: {run_dir / 'lora.safetensors'}  loss curve: {run_dir / 'loss.png'}")
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="few-step samples from the model (optionally with a LoRA)")
    p.add_argument("--model", choices=MODELS, default="toy")
    p.add_argument("--weights", help="toy weights file (default: the shipped toy base)")
    p.add_argument("--lora", help="LoRA .safetensors to apply")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    p.add_argument("--n", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import torch

    from .denoiser import sample
    from .lora import lora_file_shape, read_lora_file
    from .plot import save_png, to_pil

    if args.steps < 1 or args.n < 1:
        raise DopsdError("--steps and --n must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DopsdError(f"output path {out} is a file; pass a folder for --out")
    den = load_model(args.model, args.weights)
    if args.lora:
        sd, meta = read_lora_file(Path(args.lora))
        rank, alpha = lora_file_shape(meta, sd)
        den.add_lora(rank, alpha).load_state_dict_comfy(sd, source=args.lora)
    ctx = den.batch_contexts([den.encode_prompt(args.prompt)] * args.n)
    latents = sample(den, ctx, (args.n, *den.latent_shape), den.sigma_grid(args.steps),
                     torch.Generator().manual_seed(args.seed))
    images = den.decode(latents)
    for i, img in enumerate(images):
        save_png(to_pil(img), out / f"sample_{i:03d}.png")
    print(f"wrote {args.n} samples to {out}")
    return 0


def add_toy_parsers(sub) -> None:
    p = sub.add_parser("toy-data", help="export the toy world's held-out concepts as image folders")
    p.add_argument("--out", required=True, help="folder; one sub-folder per concept (star, heart, crescent)")
    p.add_argument("--n", type=int, default=6, help="images per concept (default 6)")
    p.set_defaults(func=cmd_toy_data)
    p = sub.add_parser("toy-pretrain", help="toy base, stage a: rectified-flow pretraining (resumable)")
    p.add_argument("--work", required=True, help="work folder for checkpoints (resumes from it)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (cosine to 10%%)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu; same run on any device)")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--prediction", choices=["v", "x0"], default="v",
                   help="what the model's last layer predicts (v: the shipped base and toy_work's checkpoint)")
    p.add_argument("--init", help="start from another run's checkpoint folder (fresh optimizer, step 0)")
    p.set_defaults(func=cmd_toy_pretrain)
    p = sub.add_parser("toy-acceptance", help="acceptance numbers of the shipped toy base (JSON)")
    p.add_argument("--out", help="also write them to this JSON file")
    p.set_defaults(func=cmd_toy_acceptance)
    p = sub.add_parser("toy-evaluator", help="train the toy evaluator (shape + colour classifier)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_toy_evaluator)
    p = sub.add_parser("toy-distill", help="toy base, stage b: 4-step trajectory distillation (resumable)")
    p.add_argument("--work", required=True, help="the work folder of toy-pretrain")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--trajectories", type=int, default=3000, help="teacher trajectories to distill from")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance of the teacher trajectories; the 4-step student samples without it")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (a resumed run uses it from its step on)")
    p.add_argument("--copy-batch", type=int, default=0,
                   help="data-supervised copy examples (reference = target) added to every step (default 0)")
    p.add_argument("--copy-from", type=int, default=0,
                   help="the step from which --copy-batch applies (continue a finished distillation with it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.set_defaults(func=cmd_toy_distill)


def add_demo_parsers(sub) -> None:
    p = sub.add_parser("demo", help="train a D-OPSD LoRA for a held-out toy concept on CPU and measure it")
    p.add_argument("--out", required=True, help="folder for lora.safetensors, loss.png, samples.png, metrics.json")
    p.add_argument("--concept", default="star", choices=["star", "heart", "crescent"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the toy budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=192, help="unrelated prompts the metrics sample (default 192)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("experiment", help="D-OPSD vs SFT on the toy model: main table, ablations, continual")
    p.add_argument("--out", required=True, help="results folder (finished runs are cached and skipped)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (CI)")
    p.set_defaults(func=cmd_experiment)


def _require_toy_weights() -> None:
    from .toy.denoiser import BASE_WEIGHTS
    from .toy.evaluator import WEIGHTS
    for path in (BASE_WEIGHTS, WEIGHTS):
        if not path.is_file():
            raise DopsdError(f"{path} is missing; build it with `dopsd toy-pretrain`, `dopsd toy-distill` "
                             "and `dopsd toy-evaluator` (see README)")


def _writable_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise DopsdError(f"output path {path} is a file; pass a folder for --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DopsdError(f"cannot create output folder {path} ({e.strerror}); choose a writable --out") from None
    return path


def cmd_demo(args) -> int:
    import json
    from .toy.runs import demo
    _require_toy_weights()
    out = _writable_dir(Path(args.out))
    if (out / "state" / "state.json").is_file():
        raise DopsdError(f"{out} already holds a demo run; choose a new --out")
    if args.steps is not None and args.steps < 1:
        raise DopsdError("--steps must be >= 1")
    bar = {}

    def progress(info):
        bar.setdefault("bar", ProgressBar(info.total)).update(info)
    if args.eval_prompts < 1:
        raise DopsdError("--eval-prompts must be >= 1")
    m = demo(out, args.concept, args.steps, args.seed, progress=progress, eval_prompts=args.eval_prompts)
    print(json.dumps({k: m[k] for k in ("base", "lora") if k in m}, indent=1))
    print(f"wrote {out / 'lora.safetensors'}, {out / 'loss.png'}, {out / 'samples.png'}, {out / 'metrics.json'}")
    return 0


def cmd_experiment(args) -> int:
    from .toy.experiment import run_experiment
    _require_toy_weights()
    out = _writable_dir(Path(args.out))
    res = run_experiment(out, quick=args.quick)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def cmd_toy_data(args) -> int:
    from .toy.render import HELD_OUT_SHAPES, export_concept_folder
    if args.n < 1:
        raise DopsdError("--n must be >= 1")
    for shape in HELD_OUT_SHAPES:
        export_concept_folder(shape, Path(args.out) / shape, n=args.n)
    print(f"wrote {len(HELD_OUT_SHAPES)} concept folders ({', '.join(HELD_OUT_SHAPES)}) to {args.out}")
    return 0


def _threads(n: int) -> None:
    import torch
    if n > 0:
        torch.set_num_threads(n)


def cmd_toy_pretrain(args) -> int:
    from .toy.pretrain import pretrain
    _threads(args.threads)
    from .toy.model import ToyConfig
    out = pretrain(Path(args.work), steps=args.steps, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                   cfg=ToyConfig(prediction=args.prediction), device=args.device,
                   init=Path(args.init) if args.init else None)
    print(f"pretrained model: {out}")
    return 0


def cmd_toy_acceptance(args) -> int:
    import json
    from .toy.experiment import acceptance
    _require_toy_weights()
    res = acceptance()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        from .fileio import save_bytes
        save_bytes(text.encode(), Path(args.out))
    return 0


def cmd_toy_evaluator(args) -> int:
    from .toy.evaluator import train_evaluator
    _threads(args.threads)
    print(f"held-out accuracy on clean renderings: {train_evaluator(steps=args.steps)}")
    return 0


def cmd_toy_distill(args) -> int:
    from .toy.pretrain import distill
    _threads(args.threads)
    if args.guidance <= 0:
        raise DopsdError("--guidance must be > 0 (1 = no guidance)")
    if not (Path(args.work) / "pretrained.safetensors").is_file():
        raise DopsdError(f"{args.work} has no pretrained.safetensors; run `dopsd toy-pretrain --work {args.work}` first")
    if not args.lr > 0:
        raise DopsdError("--lr must be > 0")
    if args.copy_batch < 0 or args.copy_from < 0:
        raise DopsdError("--copy-batch and --copy-from must be >= 0")
    out = distill(Path(args.work), steps=args.steps, n_traj=args.trajectories, guidance=args.guidance,
                  device=args.device, copy_batch=args.copy_batch, copy_from=args.copy_from, lr=args.lr)
    print(f"distilled model: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dopsd", description="D-OPSD LoRA training for step-distilled flow models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_demo_parsers(sub)
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

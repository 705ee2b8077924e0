"""The toy world's commands of `dopsd`: toy-data, toy-pretrain, toy-distill, toy-evaluator,
toy-acceptance, demo and experiment (dopsd_core.cli registers them through add_toy_parsers)."""
from __future__ import annotations

from pathlib import Path

from ..cli import ProgressBar
from ..errors import DopsdError


def add_toy_parsers(sub) -> None:
    _add_demo_parsers(sub)
    _add_toy_world_parsers(sub)


def _add_toy_world_parsers(sub) -> None:
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
                   help="what the model's last layer predicts (v: the shipped base and its pretraining checkpoints)")
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


def _add_demo_parsers(sub) -> None:
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
    p.add_argument("--stage", choices=["prune", "main", "gap", "chains", "lambda", "onestate", "budget", "budgetchains",
                                        "report"],
                   help="the trade-off study instead (toy/study.py), each stage resumable and running the ones "
                        "before it first: prune = the lr grid on the star, main = the kept lrs on every concept "
                        "and seed, gap = 4- vs 32-step quality at the matched points, chains = continual "
                        "star -> heart -> crescent, lambda = the prior's weight, onestate = D-OPSD + prior "
                        "supervising one roll-out state per step (equal compute), budget = both methods with the "
                        "prior at lr 3e-3 for 400 steps, budgetchains = the continual chains at the toy's defaults (lr 3e-3, 300 steps a stage); "
                        "report = results from the "
                        "cached runs only")
    p.add_argument("--jobs", type=int, default=1,
                   help="study runs at once, one torch thread each (default 1; 2 on a 2-core machine)")
    p.set_defaults(func=cmd_experiment)


def _require_toy_weights() -> None:
    from .denoiser import BASE_WEIGHTS
    from .evaluator import WEIGHTS
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
    from .runs import demo
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
    from .experiment import run_experiment
    _require_toy_weights()
    out = _writable_dir(Path(args.out))
    if args.stage:
        from .study import run_study
        from .study_report import report
        if args.jobs < 1:
            raise DopsdError(f"--jobs must be at least 1, got {args.jobs}")
        report(out) if args.stage == "report" else run_study(out, args.stage, jobs=args.jobs)
        print((out / "results.md").read_text())
        return 0
    run_experiment(out, quick=args.quick)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def cmd_toy_data(args) -> int:
    from .render import HELD_OUT_SHAPES, export_concept_folder
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
    from .pretrain import pretrain
    _threads(args.threads)
    from .model import ToyConfig
    out = pretrain(Path(args.work), steps=args.steps, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                   cfg=ToyConfig(prediction=args.prediction), device=args.device,
                   init=Path(args.init) if args.init else None)
    print(f"pretrained model: {out}")
    return 0


def cmd_toy_acceptance(args) -> int:
    import json
    from .experiment import acceptance
    _require_toy_weights()
    res = acceptance()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        from ..fileio import save_bytes
        save_bytes(text.encode(), Path(args.out))
    return 0


def cmd_toy_evaluator(args) -> int:
    from .evaluator import train_evaluator
    _threads(args.threads)
    print(f"held-out accuracy on clean renderings: {train_evaluator(steps=args.steps)}")
    return 0


def cmd_toy_distill(args) -> int:
    from .pretrain import distill
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



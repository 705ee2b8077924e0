"""The lab's commands: `python -m experiments.toy.lab COMMAND ...` from the repository's root.

  experiment      D-OPSD vs SFT on the toy model (main table, ablations, continual); with --stage, the
                  trade-off study's stages (study.py)
  toy-pretrain    toy base, stage a: rectified-flow pretraining (pretrain.py)
  toy-distill     toy base, stage b: 4-step trajectory distillation (pretrain.py)
  toy-evaluator   train the toy evaluator (evaluator_training.py)
  toy-acceptance  the shipped base's acceptance numbers (experiment.py)

The lab uses dopsd_core; the package never imports the lab, and none of it is in the wheel.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dopsd_core.errors import DopsdError, NonFiniteLoss
from dopsd_core.toy.cli import require_toy_weights, writable_dir

STUDY_STAGES = ("prune", "main", "gap", "chains", "lambda", "onestate", "budget", "budgetchains", "adapters", "levers",
                "combos", "defaultschains", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage by default)
        raise DopsdError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m experiments.toy.lab",
                     description="The toy lab: the experiment and the trade-off study, base and evaluator training, "
                                 "the base's acceptance check")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("experiment", help="D-OPSD vs SFT on the toy model: main table, ablations, continual")
    p.add_argument("--out", required=True, help="results folder (finished runs are cached and skipped)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (CI)")
    p.add_argument("--stage", choices=STUDY_STAGES,
                   help="the trade-off study instead (study.py), each stage resumable and running the ones "
                        "before it first: prune = the lr grid on the star, main = the kept lrs on every concept "
                        "and seed, gap = 4- vs 32-step quality at the matched points, chains = continual "
                        "star -> heart -> crescent, lambda = the prior's weight, onestate = D-OPSD + prior "
                        "supervising one roll-out state per step (equal compute), budget = both methods with the "
                        "prior at lr 3e-3 for 400 steps, budgetchains = the continual chains at the toy's defaults "
                        "(lr 3e-3, 300 steps a stage), adapters = LoKr and LoHa against LoRA at equal trainable "
                        "parameters at the defaults, levers = each lever on a step's cost alone from the defaults, "
                        "combos = levers together, defaultschains = the continual chains at the defaults the "
                        "levers' rule picked; report = results from the cached runs only")
    p.add_argument("--only", action="store_true",
                   help="with --stage budget, adapters, levers or combos: run only that stage's runs, not the "
                        "stages before it (their runs stay as they are)")
    p.add_argument("--jobs", type=int, default=1,
                   help="study runs at once, one torch thread each (default 1; 2 on a 2-core machine)")
    p.set_defaults(func=cmd_experiment)
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
    p = sub.add_parser("toy-evaluator", help="train the toy evaluator (shape + colour classifier)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.set_defaults(func=cmd_toy_evaluator)
    p = sub.add_parser("toy-acceptance", help="acceptance numbers of the shipped toy base (JSON)")
    p.add_argument("--out", help="also write them to this JSON file")
    p.set_defaults(func=cmd_toy_acceptance)
    return parser


def _threads(n: int) -> None:
    import torch
    if n > 0:
        torch.set_num_threads(n)


def cmd_experiment(args) -> int:
    require_toy_weights()
    out = writable_dir(Path(args.out))
    if args.only and args.stage in (None, "report"):
        raise DopsdError("--only runs one stage's runs: name it with --stage budget, adapters, levers or combos")
    if args.stage:
        if args.jobs < 1:
            raise DopsdError(f"--jobs must be at least 1, got {args.jobs}")
        if args.stage == "report":
            from .study_report import report
            report(out)
        else:
            from .stages import run_study
            run_study(out, args.stage, jobs=args.jobs, only=args.only)
        print((out / "results.md").read_text())
        return 0
    from .experiment import run_experiment
    run_experiment(out, quick=args.quick)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def cmd_toy_pretrain(args) -> int:
    from dopsd_core.toy.model import ToyConfig
    from .pretrain import pretrain
    _threads(args.threads)
    out = pretrain(Path(args.work), steps=args.steps, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                   cfg=ToyConfig(prediction=args.prediction), device=args.device,
                   init=Path(args.init) if args.init else None)
    print(f"pretrained model: {out}")
    return 0


def cmd_toy_distill(args) -> int:
    from .pretrain import distill
    _threads(args.threads)
    if args.guidance <= 0:
        raise DopsdError("--guidance must be > 0 (1 = no guidance)")
    if not (Path(args.work) / "pretrained.safetensors").is_file():
        raise DopsdError(f"{args.work} has no pretrained.safetensors; run "
                         f"`python -m experiments.toy.lab toy-pretrain --work {args.work}` first")
    if not args.lr > 0:
        raise DopsdError("--lr must be > 0")
    if args.copy_batch < 0 or args.copy_from < 0:
        raise DopsdError("--copy-batch and --copy-from must be >= 0")
    out = distill(Path(args.work), steps=args.steps, n_traj=args.trajectories, guidance=args.guidance,
                  device=args.device, copy_batch=args.copy_batch, copy_from=args.copy_from, lr=args.lr)
    print(f"distilled model: {out}")
    return 0


def cmd_toy_evaluator(args) -> int:
    from .evaluator_training import train_evaluator
    _threads(args.threads)
    print(f"held-out accuracy on clean renderings: {train_evaluator(steps=args.steps)}")
    return 0


def cmd_toy_acceptance(args) -> int:
    import json
    from .experiment import acceptance
    require_toy_weights()
    text = json.dumps(acceptance(), indent=1)
    print(text)
    if args.out:
        from dopsd_core.fileio import save_bytes
        save_bytes(text.encode(), Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="lab: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DopsdError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1

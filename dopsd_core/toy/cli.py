"""The toy world's commands of `dopsd`: toy-data and demo (dopsd_core.cli registers them through
add_toy_parsers). The lab's commands (the experiment and the study, base and evaluator training, the
acceptance check) are `python -m experiments.toy.lab` in a git checkout, not part of the package."""
from __future__ import annotations

from pathlib import Path

from ..errors import DopsdError
from ..progress import ProgressBar


def add_toy_parsers(sub) -> None:
    _add_demo_parsers(sub)
    _add_toy_world_parsers(sub)


def _add_toy_world_parsers(sub) -> None:
    p = sub.add_parser("toy-data", help="export the toy world's held-out concepts as image folders")
    p.add_argument("--out", required=True, help="folder; one sub-folder per concept (star, heart, crescent)")
    p.add_argument("--n", type=int, default=6, help="images per concept (default 6)")
    p.set_defaults(func=cmd_toy_data)


def _add_demo_parsers(sub) -> None:
    p = sub.add_parser("demo", help="train a D-OPSD LoRA for a held-out toy concept on CPU and measure it")
    p.add_argument("--out", required=True, help="folder for lora.safetensors, loss.png, samples.png, metrics.json")
    p.add_argument("--concept", default="star", choices=["star", "heart", "crescent"])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the toy's defaults' steps, or fewer that still meet the study's "
                        "aims where the defaults would pass 5 minutes on 2 cores; the README says which)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=192, help="unrelated prompts the metrics sample (default 192)")
    p.set_defaults(func=cmd_demo)


def require_toy_weights() -> None:
    from .denoiser import BASE_WEIGHTS
    from .evaluator import WEIGHTS
    for path in (BASE_WEIGHTS, WEIGHTS):
        if not path.is_file():
            raise DopsdError(f"{path} is missing; reinstall the package, or build it in a git checkout with "
                             "`python -m experiments.toy.lab toy-pretrain`, `toy-distill` and `toy-evaluator`")


def writable_dir(path: Path) -> Path:
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
    require_toy_weights()
    out = writable_dir(Path(args.out))
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


def cmd_toy_data(args) -> int:
    from .render import HELD_OUT_SHAPES, export_concept_folder
    if args.n < 1:
        raise DopsdError("--n must be >= 1")
    for shape in HELD_OUT_SHAPES:
        export_concept_folder(shape, Path(args.out) / shape, n=args.n)
    print(f"wrote {len(HELD_OUT_SHAPES)} concept folders ({', '.join(HELD_OUT_SHAPES)}) to {args.out}")
    return 0

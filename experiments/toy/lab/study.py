"""The trade-off study on the toy: how much of a concept each method learns for how much of everything
else it keeps, along each run, at 4 steps.

Variants: D-OPSD and SFT, each without and with prior preservation (auto prompts, lambda 1, 4 prior
samples per step). Every run saves a LoRA every 10 steps; the ones at CHECKPOINTS are evaluated at 4
steps (dopsd_core/toy/metrics.py: fidelity on 96 samples, retention and leak on the 192 evaluation prompts,
cross_token, and retention on a separate selection set used only to pick points).

Stages (each resumable: finished runs and evaluated checkpoints are cached under OUT/runs/):
  prune  the star, seed 0, rank 16: every variant at lr 1e-4, 3e-4 and 1e-3 -> the lr kept per variant
  main   the kept lr per variant x 3 concepts x 3 seeds, rank 16; and rank 3 (1.9 % of the toy's width,
         like the paper's rank 64 on its models) for the star
  gap    the 4- and 32-step toy-FID of the unrelated prompts at every main run's matched points
  chains continual tuning star -> heart -> crescent with the prior, 3 seeds, and the warm-start teachers
         (chains.py)
  lambda the prior's weight: 0.3 and 3 against main's 1, both methods, the star, seed 0
  onestate D-OPSD + prior with one supervised roll-out state per step (--states one, 4.5 instead of 12
         model evaluations per sample) x 3 concepts x 3 seeds: the equal-compute comparison with SFT + prior
  budget both methods with the prior at a larger budget (lr 3e-3, past main's grid, for 400 steps, evaluated
         at main's checkpoints and then every 100 steps) x 3 concepts x 3 seeds: the probes found the star
         needs a larger update than main's (experiments/toy/probes/README.md)
  budgetchains the continual chains at the toy's defaults of the time (the budget stage's lr, 300 steps a
         stage), from the budget stage's star runs at that step
  adapters LoKr and LoHa against LoRA at about equal trainable parameters (ADAPTER_SETTINGS), D-OPSD + prior
         at the defaults of the time (ORIGIN) x 3 concepts x 3 seeds, evaluated at the defaults' last step; LoRA's
         arm is the budget stage's runs at that step (same lr, seeds and prior; a constant lr makes step 300
         of a 400-step run the 300-step run)
  levers what each lever on a D-OPSD + prior step's cost costs in fidelity, retention and leak, one at a
         time from the defaults (LEVERS), 3 concepts x 3 seeds, evaluated along the run: the defaults' own
         runs are the budget stage's; and long SFT + prior runs (SFT_LONG) for equal compute
  combos the levers together (COMBOS), as the levers stage's results point to them, run as the levers
  defaultschains the continual chains at the defaults the levers' rule picked (DEFAULTS_SETTING)
A matched point at tau is the checkpoint with the best fidelity whose selection-set retention is >= tau.
Compute is counted in model evaluations (a forward or a backward of one sample), not in seconds.

This module holds the runs: their plans, training and evaluation, matched points and the lr choice. The
continual chains are in chains.py, the report in study_report.py, and stages.py runs the stages; each
imports only the ones before it (study <- chains <- study_report <- stages).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dopsd_core.errors import DopsdError
from dopsd_core.fileio import save_json
from dopsd_core.toy.metrics import ToyMetrics, concept_training_set, generate, hit_string
from dopsd_core.toy.render import HELD_OUT_SHAPES
from dopsd_core.toy.runs import auto_prior, train_concept
from dopsd_core.toy.text import BACKGROUNDS, COLOURS, SEEN_SHAPES
from .runs import load_with_lora

CHECKPOINTS = (10, 20, 40, 80, 140, 200)
LRS = (1e-4, 3e-4, 1e-3)
VARIANTS = (("dopsd", False), ("dopsd", True), ("sft", False), ("sft", True))
TAUS = (0.8, 0.7, 0.6)
# The prior of every stage's runs (TOY_PRIOR when they were planned: lambda 1, 4 roll-outs per step, on
# every step, supervised as the concept's), pinned like ORIGIN below so that new toy defaults change no
# cached run's meaning; a run's own settings (StudyRun) override it.
PRIOR = dict(prior_weight=1.0, prior_batch=4, prior_every=1, prior_states="same")
BATCH = 4  # every run's batch (pinned with PRIOR)
SMALL_RANK = 3
LAMBDAS = (0.3, 3.0)  # the lambda stage's prior weights (main runs have PRIOR's 1)
LAMBDA_CONCEPTS = ("star",)
BUDGET = dict(lr=3e-3, steps=400)  # the budget stage's runs
# The defaults the adapters and levers stages start from (TOY_BUDGET when they were planned), pinned so that a
# later change of the toy's defaults leaves their cached runs' names and meaning alone.
ORIGIN = dict(lr=3e-3, rank=16, steps=300)
# SFT + prior run past the budget stage's 400 steps, so that the levers' D-OPSD settings meet it at equal
# compute up to 19,200 model evaluations (two thirds of the origin's 28,800), evaluated every 100 steps.
SFT_LONG = dict(lr=3e-3, steps=3000, every=100)
# ... first run to 1200 steps (19,200 evaluations); the 3000-step runs (48,000: the rank-64 combinations'
# 500 steps) repeat them and go on, and stand for them in the report once in (study_report.longest)
SFT_LONG_FIRST = 1200
LONG_EVERY = 100  # past main's last checkpoint, a run is evaluated every this many steps
N_UNRELATED = 192  # the evaluation set of retention and leak (dopsd_core/toy/metrics.py)
N_SELECTION = 96  # the selection set that picks matched points (selection_prompts)
# The adapters stage: settings with LoRA rank 16's trainable parameters on the toy (204,800): LoHa rank 8
# has exactly as many (2 x 8 x (in + out) per layer); LoKr at factor 2, rank 32 has 204,880 (w1 2 x 2, w2 a
# rank-32 [out/2, in/2]; a larger factor leaves w2 narrower than any rank that would match).
ADAPTER_SETTINGS = {"lokr": dict(rank=32, lokr_factor=2), "loha": dict(rank=8)}
# The levers stage, each one change from the defaults (D-OPSD + prior, ORIGIN, PRIOR): fewer prior
# roll-outs (every k-th step at k times the weight, or fewer prompts per step), the prior or the concept
# term on fewer supervised states, and fewer steps at a larger lr and rank (the probes' rank 64 / lr 2e-3).
# Ordered so that a stage cut short has first what the star and the cost most depend on (the order changes
# no run): the larger update the probes found for the star, then the levers that cut the most evaluations.
LEVERS = {
    "rank 64, lr 2e-3": dict(rank=64, lr=2e-3),
    "concept one state": dict(states="one", prior_states="all"),  # the prior keeps all K: one lever at a time
    "prior one state": dict(prior_states="one"),
    "prior every 4": dict(prior_every=4), "prior batch 1": dict(prior_batch=1),
    "prior every 2": dict(prior_every=2), "prior batch 2": dict(prior_batch=2),
    "concept two states": dict(states="two", prior_states="all"),
}

# The combos stage: levers together, as the one-at-a-time results point to them (each a StudyRun change
# from ORIGIN). The levers stage: rank 64 / lr 2e-3 is the only lever that raised the star (63 % -> 71 % at
# step 300, still rising), and every cut of the prior cost it a few points, prior batch 1 the most
# evaluations saved for that (60 a step: star 58 %). So: rank 64 / lr 2e-3 run on to 500 steps, alone
# (it stands for the lever's 300-step runs: study_report.longest) and with one prior roll-out a step.
COMBOS: dict[str, dict] = {
    "rank 64, lr 2e-3, prior batch 1, 500 steps": dict(rank=64, lr=2e-3, prior_batch=1, steps=500),
    "rank 64, lr 2e-3, 500 steps": dict(rank=64, lr=2e-3, steps=500),
}
# The toy's defaults as the levers' rule picked them: (a lever or combination, its step count); ("", 0)
# until picked. The defaultschains stage runs the continual chains there.
DEFAULTS_SETTING: tuple[str, int] = ("rank 64, lr 2e-3, 500 steps", 400)


def setting_change(name: str) -> dict:
    """A lever's or a combination's StudyRun change from ORIGIN."""
    settings = {**LEVERS, **COMBOS}
    if name not in settings:
        raise DopsdError(f"no lever or combination named {name!r}; choose one of {', '.join(settings)}")
    return settings[name]


@dataclass(frozen=True)
class StudyRun:
    concept: str
    method: str
    prior: bool
    lr: float
    seed: int = 0
    rank: int = 16
    prior_weight: float = 1.0  # lambda, when prior
    states: str = "all"  # D-OPSD's supervised roll-out states: all K, or one random state per roll-out
    steps: int = 0  # 0: main's length (the last of CHECKPOINTS)
    adapter: str = "lora"
    lokr_factor: int = -1
    prior_every: int = 1  # the prior term on every k-th step (k times the weight)
    prior_states: str = "same"  # the prior roll-outs' supervised states ("same": as states)
    prior_batch: int = 0  # prior roll-outs per step; 0: PRIOR's
    eval_steps: tuple[int, ...] = ()  # evaluated checkpoints, when not main's (below)

    @property
    def name(self) -> str:
        weight = f"_w{self.prior_weight:g}" if self.prior and self.prior_weight != PRIOR["prior_weight"] else ""
        steps = f"_st{self.steps}" if self.steps else ""
        states = {"all": "", "one": "_onestate", "two": "_twostates"}[self.states]
        adapter = "" if self.adapter == "lora" else f"_{self.adapter}" + (
            f"-f{self.lokr_factor}" if self.adapter == "lokr" else "")
        lever = (f"{f'_pevery{self.prior_every}' if self.prior_every != 1 else ''}"
                 f"{f'_pstates-{self.prior_states}' if self.prior_states != 'same' else ''}"
                 f"{f'_pbatch{self.prior_batch}' if self.prior_batch else ''}")
        return (f"{self.concept}_{self.method}{'_prior' if self.prior else ''}{weight}{states}{adapter}{lever}"
                f"_lr{self.lr:g}_r{self.rank}{steps}_s{self.seed}")

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """main's checkpoints, then every LONG_EVERY steps up to the run's own length (or eval_steps)."""
        if self.eval_steps:
            return tuple(self.eval_steps)
        return CHECKPOINTS + tuple(range(CHECKPOINTS[-1] + LONG_EVERY, self.steps + 1, LONG_EVERY))

    @property
    def variant(self) -> str:
        return (f"{self.method}{' + prior' if self.prior else ''}{', one state' if self.states == 'one' else ''}"
                f"{', two states' if self.states == 'two' else ''}{'' if self.adapter == 'lora' else ', ' + self.adapter}"
                f"{f', prior every {self.prior_every}' if self.prior_every != 1 else ''}"
                f"{f', prior {self.prior_states} state' + ('' if self.prior_states == 'one' else 's') if self.prior_states != 'same' else ''}"
                f"{f', prior batch {self.prior_batch}' if self.prior_batch else ''}"
                f"{', rank 64, lr 2e-3' if (self.rank, self.lr) == (64, 2e-3) else ''}")


def selection_prompts(n: int = 96, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """A second set of unrelated prompts (worded 'the ...', unlike the evaluation set and the prior),
    used only to choose matched points, so the reported retention is measured on other prompts."""
    rng = random.Random(f"selection-{seed}")
    out = []
    for i in range(n):
        shape, colour = SEEN_SHAPES[(i + 3) % len(SEEN_SHAPES)], COLOURS[(i * 5) % len(COLOURS)]
        bg = rng.choice(BACKGROUNDS)
        out.append((f"the {colour} {shape} on a {bg} background", shape, colour, bg))
    return out


def rollout_evals(states: str, k: int = 4) -> float:
    """Model evaluations of one sample's D-OPSD roll-out, on average over the random states: each
    supervised state costs a teacher forward, a student forward and a backward (3); each state the student
    only steps through before the last supervised one costs one no-grad forward."""
    from itertools import combinations
    if states == "all":
        return 3.0 * k
    n = {"one": 1, "two": 2}[states]
    picks = list(combinations(range(k), n))
    return sum(max(p) + 1 - n + 3 * n for p in picks) / len(picks)  # max(p) + 1 states reached, n of them supervised


def evals_per_step(method: str, prior: bool, k: int = 4, batch: int = BATCH,
                   states: str = "all", prior_states: str = "same", prior_batch: int = 0,
                   prior_every: int = 1) -> float:
    """Model evaluations (one sample's forward or backward) per optimizer step: the concept's roll-outs
    (rollout_evals; SFT: one forward and one backward a sample) plus the prior's, whose prior_batch samples
    (0: PRIOR's) come every prior_every-th step."""
    prior_n = (prior_batch or PRIOR["prior_batch"]) / prior_every if prior else 0
    if method != "dopsd":
        return 2 * (batch + prior_n)
    return rollout_evals(states, k) * batch + rollout_evals(states if prior_states == "same" else prior_states, k) * prior_n


def setup_evals(method: str, prior: bool, n_prior_prompts: int, k: int = 4) -> int:
    """One-off evaluations: SFT's prior samples its class images once (K forwards each)."""
    from dopsd_core.trainer import PRIOR_CLASS_IMAGES
    return max(PRIOR_CLASS_IMAGES, n_prior_prompts) * k if (method == "sft" and prior) else 0


class StudyMetrics(ToyMetrics):
    """ToyMetrics plus the selection set's retention (4 steps only: the checkpoints' metrics)."""

    def __init__(self, *args, n_selection: int = N_SELECTION, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection = selection_prompts(n_selection)

    @torch.no_grad()
    def checkpoint(self, den, concept: str, captions: list[str]) -> dict:
        r = self.evaluate(den, concept, captions, quality=False)
        images = generate(den, [p for p, *_ in self.selection], 4, self.seed + 7)
        shapes, colours = self.ev.classify(images)
        hits = [s == ws and c == wc for s, c, (_, ws, wc, _) in zip(shapes, colours, self.selection)]
        r["retention_selection"] = sum(hits) / len(hits)
        r["hits"]["retention_selection"] = hit_string(hits)
        return r


def prune_plan() -> list[StudyRun]:
    return [StudyRun(HELD_OUT_SHAPES[0], m, p, lr) for m, p in VARIANTS for lr in LRS]


def main_plan(kept_lr: dict[str, float]) -> list[StudyRun]:
    runs = [StudyRun(c, m, p, kept_lr[StudyRun(c, m, p, 0).variant], s)
            for c in HELD_OUT_SHAPES for s in range(3) for m, p in VARIANTS]
    runs += [StudyRun(HELD_OUT_SHAPES[0], m, p, kept_lr[StudyRun("", m, p, 0).variant], 0, SMALL_RANK)
             for m, p in VARIANTS]
    return runs


def lambda_plan(kept_lr: dict[str, float]) -> list[StudyRun]:
    return [StudyRun(c, m, True, kept_lr[f"{m} + prior"], 0, prior_weight=w)
            for c in LAMBDA_CONCEPTS for m in ("dopsd", "sft") if f"{m} + prior" in kept_lr for w in LAMBDAS]


def one_state_plan(kept_lr: dict[str, float]) -> list[StudyRun]:
    """D-OPSD + prior at its kept lr with one supervised state per step (none if the variant was not run)."""
    lr = kept_lr.get("dopsd + prior")
    return [StudyRun(c, "dopsd", True, lr, s, states="one") for c in HELD_OUT_SHAPES for s in range(3)] if lr else []


def budget_plan() -> list[StudyRun]:
    return [StudyRun(c, m, True, BUDGET["lr"], s, steps=BUDGET["steps"])
            for c in HELD_OUT_SHAPES for s in range(3) for m in ("dopsd", "sft")]


def adapter_plan() -> list[StudyRun]:
    steps = ORIGIN["steps"]
    return [StudyRun(c, "dopsd", True, ORIGIN["lr"], s, steps=steps, eval_steps=(steps,), adapter=a,
                     **ADAPTER_SETTINGS[a]) for a in ADAPTER_SETTINGS for c in HELD_OUT_SHAPES for s in range(3)]


def lever_plan() -> list[StudyRun]:
    """Each lever alone from the defaults, evaluated at main's checkpoints and the defaults' last step."""
    return [StudyRun(c, "dopsd", True, seed=s, **{**ORIGIN, **change}) for change in LEVERS.values()
            for c in HELD_OUT_SHAPES for s in range(3)]


def combo_plan() -> list[StudyRun]:
    """Each combination of levers from the defaults, 3 concepts x 3 seeds, evaluated as the levers."""
    return [StudyRun(c, "dopsd", True, seed=s, **{**ORIGIN, **change}) for change in COMBOS.values()
            for c in HELD_OUT_SHAPES for s in range(3)]


def sft_long_plan(steps: int = 0) -> list[StudyRun]:
    """SFT + prior at the origin's lr for SFT_LONG's steps (or `steps`), evaluated every SFT_LONG['every']
    steps."""
    every, steps = SFT_LONG["every"], steps or SFT_LONG["steps"]
    return [StudyRun(c, "sft", True, SFT_LONG["lr"], s, steps=steps, eval_steps=tuple(range(every, steps + 1, every)))
            for c in HELD_OUT_SHAPES for s in range(3)]


def levers_stage_plan() -> list[StudyRun]:
    """The levers stage's runs: the first lever, then the long SFT runs (equal compute needs them), then the rest."""
    levers = lever_plan()
    return levers[:9] + sft_long_plan() + levers[9:]


def train_settings(run: StudyRun) -> dict:
    """The TrainConfig fields of a run (a chain's stages take its first run's): all written out, so that no
    toy default reaches a cached run."""
    out = dict(lr=run.lr, rank=run.rank, alpha=float(run.rank), batch_size=BATCH, states=run.states,
               adapter=run.adapter, lokr_factor=run.lokr_factor)
    if run.prior:
        out.update(prior_weight=run.prior_weight, prior_every=run.prior_every, prior_states=run.prior_states,
                   prior_batch=run.prior_batch or PRIOR["prior_batch"])
    return out


def run_one(run: StudyRun, out: Path, metrics: StudyMetrics, log=print) -> dict:
    """Train (cached: a finished run is not retrained) and evaluate every checkpoint (cached per step)."""
    run_dir = out / "runs" / run.name
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    train_dir = run_dir / "train"
    prompts = auto_prior(run.concept, out) if run.prior else None
    t0 = time.perf_counter()
    checkpoints = run.checkpoints
    if not (train_dir / f"lora-{checkpoints[-1]:06d}.safetensors").is_file():
        if train_dir.exists():  # an interrupted run: start it over (it keeps a LoRA per save point)
            import shutil
            shutil.rmtree(train_dir)
        every = checkpoints[0]
        assert all(c % every == 0 for c in checkpoints), "checkpoints must be multiples of the first"
        train_concept(run.concept, run.method, train_dir, out, seed=run.seed, steps=checkpoints[-1],
                      save_every=every, prior_prompts=prompts, **train_settings(run))
    train_s = time.perf_counter() - t0
    captions = [caps[0] for caps in concept_training_set(run.concept)[1]]
    per_step = evals_per_step(run.method, run.prior, states=run.states, prior_states=run.prior_states,
                              prior_batch=run.prior_batch, prior_every=run.prior_every)
    setup = setup_evals(run.method, run.prior, len(prompts or []))
    points = []
    for step in checkpoints:
        point_file = run_dir / "eval" / f"step-{step:06d}.json"
        if point_file.is_file():
            points.append(json.loads(point_file.read_text()))
            continue
        den = load_with_lora(train_dir / f"lora-{step:06d}.safetensors")
        point = {"step": step, "model_evals": setup + step * per_step,
                 **metrics.checkpoint(den, run.concept, captions)}
        save_json(point, point_file)
        points.append(point)
    result = {"run": asdict(run), "name": run.name, "variant": run.variant, "train_seconds": round(train_s, 1),
              "evals_per_step": per_step, "setup_evals": setup, "prior_prompts": len(prompts or []),
              "points": points}
    save_json(result, result_file)
    log(f"{run.name}: " + ", ".join(f"@{p['step']} fid {p['concept_fidelity']:.2f} ret {p['retention']:.2f} "
                                      f"leak {p['leak']:.2f}" for p in points))
    return result


def matched(points: list[dict], tau: float, max_evals: int | None = None) -> dict | None:
    """The checkpoint with the best fidelity among those whose selection-set retention is >= tau
    (max_evals: only checkpoints within that many model evaluations: the equal-compute front)."""
    ok = [p for p in points if p["retention_selection"] >= tau and (max_evals is None or p["model_evals"] <= max_evals)]
    return max(ok, key=lambda p: (p["concept_fidelity"], p["retention_selection"])) if ok else None


def choose_lr(results: list[dict]) -> dict[str, dict]:
    """Per variant, the lr with the largest sum of matched fidelities over TAUS (0 where a tau is not
    reached): a coarse area under the fidelity-retention front; ties go to the smaller lr."""
    chosen = {}
    for variant in sorted({r["variant"] for r in results}):
        scored = []
        for r in results:
            if r["variant"] == variant:
                at = {tau: (m["concept_fidelity"] if (m := matched(r["points"], tau)) else 0.0) for tau in TAUS}
                scored.append((sum(at.values()), -r["run"]["lr"], r["run"]["lr"], at))
        score, _, lr, at = max(scored)
        chosen[variant] = {"lr": lr if score > 0 else None, "score": score, "fidelity_at": at}
    return chosen


def kept_lrs(prune: list[dict]) -> dict[str, float]:
    kept = {v: c["lr"] for v, c in choose_lr(prune).items()}
    if any(lr is None for lr in kept.values()):
        raise DopsdError(f"no lr gave fidelity at retention >= {TAUS[-1]} for some variant ({kept}); "
                         "see results.md")
    return kept


def gap_points(run: dict) -> list[int]:
    """The steps of a run's matched points (at every tau), each once."""
    return sorted({m["step"] for tau in TAUS if (m := matched(run["points"], tau))})


def gap_run(r: dict, out: Path, metrics: StudyMetrics, log=print) -> None:
    """The 4-vs-32-step gap at one main run's matched points (cached per point; the report compares
    rank 3 at 4 steps only, so the gap stage skips those runs)."""
    run_dir = out / "runs" / r["name"]
    for step in gap_points(r):
        f = run_dir / "eval" / f"gap-{step:06d}.json"
        if f.is_file():
            continue
        lora = run_dir / "train" / f"lora-{step:06d}.safetensors"
        if not lora.is_file():
            raise DopsdError(f"{lora} is missing (the gap stage needs the run's LoRAs); delete "
                             f"{run_dir / 'result.json'} to retrain the run")
        g = metrics.few_step_quality(load_with_lora(lora))
        save_json({"step": step, **g}, f)
        log(f"{r['name']} @{step}: toy-FID 4 steps {g['quality_4']:.0f}, 32 steps {g['quality_32']:.0f}")

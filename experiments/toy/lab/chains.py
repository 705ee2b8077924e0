"""Continual tuning on the toy: star -> heart -> crescent, each LoRA warm-started from the previous one.

Every stage trains with the prior (auto prompts: the warm start's recorded concepts join them, and its
LoRA is the prior's anchor), at the study's kept lr for the method and its full run length. Variants:
  dopsd + prior               the concept teacher is the EMA of the student, which starts at the warm start
  dopsd + prior, base teacher the concept teacher is the frozen base (--teacher frozen)
  sft + prior
A chain runs at the study's kept lr and main's run length; or (budget=True) at the toy's defaults of the
time (the budget stage's lr, 300 steps), starting from the budget stage's star run at that step; or at a
setting of the levers or combos stage (the toy's defaults the levers' rule picked) for a number of steps
that its runs evaluated, starting from that setting's star run at that step (SFT + prior: at the setting's
lr, rank and run length). The first stage is that single-concept run of the star (same method, settings, seed): a
fresh run has no warm start, so the teacher choice does not arise there. Every later stage trains with its
first run's settings. After every stage each concept learned so far is measured at 4 steps; a concept's
kept share is its fidelity at the end of the chain over its fidelity in its own single-concept run (the
same settings, method and seed, at the chain's step count).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dopsd_core.errors import DopsdError
from dopsd_core.fileio import save_json
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.metrics import FIDELITY_SEEDS, concept_training_set
from dopsd_core.toy.render import HELD_OUT_SHAPES
from dopsd_core.toy.runs import auto_prior, train_concept
from .runs import load_with_lora
from .stats import bootstrap_difference, per_prompt
from .study import (BUDGET, CHECKPOINTS, ORIGIN, StudyMetrics, StudyRun, run_one, setting_change, setup_evals,
                    train_settings)

SEEDS = (0, 1, 2)
VARIANTS = {"dopsd + prior": ("dopsd", "ema"), "dopsd + prior, base teacher": ("dopsd", "frozen"),
            "sft + prior": ("sft", "ema")}  # name -> (method, concept teacher); SFT has no teacher
# the budget chains' stage length: the budget stage's lr at the toy's defaults when they ran (300 steps)
TOY_BUDGET_STEPS = ORIGIN["steps"]


@dataclass(frozen=True)
class Chain:
    variant: str
    seed: int
    budget: bool = False  # the budget stage's lr and 300 steps instead of the kept lr and main's length
    setting: str = ""  # or a lever or combination (study.LEVERS / COMBOS) from ORIGIN, `at` steps a stage:
    at: int = 0        # the toy's defaults picked by the levers' rule (SFT takes its lr, rank and steps only)

    @property
    def name(self) -> str:
        setting = f"_{self.setting.replace(', ', '_').replace(' ', '-')}_at{self.at}" if self.setting else ""
        return (self.variant.replace(" + ", "_").replace(", ", "_").replace(" ", "_")
                + ("_budget" if self.budget else "") + setting + f"_s{self.seed}")

    @property
    def method(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def steps(self) -> int:
        return self.at if self.setting else TOY_BUDGET_STEPS if self.budget else CHECKPOINTS[-1]

    def lr(self, kept_lr: dict[str, float]) -> float:
        return self.first_run(kept_lr).lr

    def single_run(self, concept: str, kept_lr: dict[str, float]) -> StudyRun:
        """The concept's own run with the chain's settings (the first stage's, for the star)."""
        if self.setting:
            change = setting_change(self.setting)
            if self.method != "dopsd":  # SFT has no roll-out states and no roll-out prior: the update and the
                change = {k: v for k, v in change.items() if k in ("lr", "rank", "steps")}  # run's length only
            return StudyRun(concept, self.method, True, seed=self.seed, **{**ORIGIN, **change})
        if not self.budget:
            return StudyRun(concept, self.method, True, kept_lr[f"{self.method} + prior"], self.seed)
        return StudyRun(concept, self.method, True, BUDGET["lr"], self.seed, steps=BUDGET["steps"])

    def first_run(self, kept_lr: dict[str, float]) -> StudyRun:
        """The star's single-concept run whose LoRA at `steps` is the chain's first stage."""
        run = self.single_run(HELD_OUT_SHAPES[0], kept_lr)
        if self.steps not in run.checkpoints:
            raise DopsdError(f"a chain of {self.steps} steps a stage needs that step among its first run's "
                             f"checkpoints ({run.name}: {run.checkpoints}); pick one of them")
        return run



def chain_plan(budget: bool = False, setting: str = "", at: int = 0) -> list[Chain]:
    if setting:
        return [Chain(v, s, setting=setting, at=at) for s in SEEDS for v in VARIANTS]
    return [Chain(v, s, budget) for s in SEEDS for v in VARIANTS]


def _captions(concept: str) -> list[str]:
    return [caps[0] for caps in concept_training_set(concept)[1]]


def measure(metrics: StudyMetrics, den, concepts: list[str]) -> dict:
    """Each concept's fidelity, leak and cross_token (its fidelity hits kept), and the retention."""
    s4 = metrics.unrelated_samples(den)  # once: every concept's leak is measured on the same samples
    out = {"concepts": {}, "retention": metrics.retention(s4)}
    for c in concepts:
        values, hits = metrics.concept_metrics(den, c, _captions(c), s4)
        out["concepts"][c] = {**values, "fid_hits": hits["concept_fidelity"]}
    return out


def run_chain(chain: Chain, out: Path, metrics: StudyMetrics, kept_lr: dict[str, float], log=print) -> dict:
    """Trains and measures every stage not cached yet; returns the chain's result (also chain.json)."""
    folder = out / "chains" / chain.name
    result_file = folder / "chain.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    method, teacher = VARIANTS[chain.variant]
    first_run = chain.first_run(kept_lr)
    lr, steps, settings = first_run.lr, chain.steps, train_settings(first_run)
    first = run_one(first_run, out, metrics, log)
    lora = out / "runs" / first["name"] / "train" / f"lora-{steps:06d}.safetensors"
    if not lora.is_file():
        raise DopsdError(f"{lora} is missing (a chain starts from its first run's final LoRA); delete "
                         f"{out / 'runs' / first['name'] / 'result.json'} to retrain that run")
    last = next(p for p in first["points"] if p["step"] == steps)
    stages = [{"concept": HELD_OUT_SHAPES[0], "lora": str(lora.relative_to(out)), "retention": last["retention"],
               "concepts": {HELD_OUT_SHAPES[0]: {"concept_fidelity": last["concept_fidelity"], "leak": last["leak"],
                                                 "cross_token": last["cross_token"],
                                                 "fid_hits": last["hits"]["concept_fidelity"]}}}]
    evals = first["setup_evals"] + steps * first["evals_per_step"]
    for i, concept in enumerate(HELD_OUT_SHAPES[1:], start=2):
        stage_dir = folder / f"{i}_{concept}"
        stage_file = stage_dir / "stage.json"
        prompts = auto_prior(concept, out, init_lora=lora)
        evals += setup_evals(method, True, len(prompts)) + steps * first["evals_per_step"]
        if not stage_file.is_file():
            train_dir = stage_dir / "train"
            if train_dir.exists():  # an interrupted stage: start it over
                shutil.rmtree(train_dir)
            train_concept(concept, method, train_dir, out, seed=chain.seed, steps=steps, init_lora=lora,
                          prior_prompts=prompts, teacher=teacher, **settings)
            m = measure(metrics, load_with_lora(train_dir / "lora.safetensors"), list(HELD_OUT_SHAPES[:i]))
            save_json({"concept": concept, "lora": str((train_dir / "lora.safetensors").relative_to(out)),
                       "prior_prompts": len(prompts), **m}, stage_file)
        stage = json.loads(stage_file.read_text())
        stages.append(stage)
        lora = out / stage["lora"]
        log(f"{chain.name} stage {i} ({concept}): " + ", ".join(
            f"{c} {v['concept_fidelity']:.2f}" for c, v in stage["concepts"].items())
            + f", retention {stage['retention']:.2f}")
    result = {"variant": chain.variant, "seed": chain.seed, "method": method, "teacher": teacher, "lr": lr,
              "steps_per_stage": steps, "budget": chain.budget, "model_evals": evals, "stages": stages,
              **({"setting": chain.setting, "rank": first_run.rank} if chain.setting else {})}
    save_json(result, result_file)
    return result


def teacher_check(out: Path, metrics: StudyMetrics, kept_lr: dict[str, float], log=print) -> None:
    """For every finished EMA-teacher chain, each warm-started stage's teacher fidelity on its new concept
    (caption + target in context, 4 steps) with the teacher it had, the warm start's LoRA (the EMA starts
    there and moves about 2 % in 200 steps at decay 0.9999), against the base's; and for the second
    stage, what the teacher would be after a star run without the prior (the main stage's D-OPSD run of
    the same seed). Cached in teacher.json."""
    base_fid = {}
    for chain_file in sorted((out / "chains").glob("*/chain.json")):
        chain = json.loads(chain_file.read_text())
        f = chain_file.parent / "teacher.json"
        if chain["teacher"] != "ema" or chain["method"] != "dopsd" or f.is_file():
            continue
        res = {}
        for prev, stage in zip(chain["stages"], chain["stages"][1:]):
            concept = stage["concept"]
            images, captions = concept_training_set(concept)
            if concept not in base_fid:
                base_fid[concept] = metrics.teacher_fidelity(load_toy_file(BASE_WEIGHTS), concept, images, captions)
            warm = metrics.teacher_fidelity(load_with_lora(out / prev["lora"]), concept, images, captions)
            res[concept] = {"base": base_fid[concept], "warm_start": warm}
            if concept == HELD_OUT_SHAPES[1] and "dopsd" in kept_lr and not chain.get("budget") \
                    and not chain.get("setting"):
                plain = StudyRun(HELD_OUT_SHAPES[0], "dopsd", False, kept_lr["dopsd"], chain["seed"])
                lora = out / "runs" / plain.name / "train" / f"lora-{CHECKPOINTS[-1]:06d}.safetensors"
                if lora.is_file():
                    res[concept]["warm_start_without_prior"] = metrics.teacher_fidelity(
                        load_with_lora(lora), concept, images, captions)
            log(f"{chain_file.parent.name}: {concept} teacher fidelity, base {base_fid[concept]:.2f}, warm start {warm:.2f}")
        save_json(res, f)


def chain_kind(chain: dict) -> str:
    """Which chains a chain.json belongs with: main's, the budget's, or a setting's ("setting@steps")."""
    if chain.get("setting"):
        return f"{chain['setting']}@{chain['steps_per_stage']}"
    return "budget" if chain.get("budget") else "main"


def teacher_summary(out: Path, budget: bool = False, kind: str | None = None) -> dict:
    """Per concept, the mean over chains (main's, the budget's, or `kind`'s) of the warm-start teacher's
    fidelity, and the base teacher's."""
    kind = kind or ("budget" if budget else "main")
    found = [json.loads(f.read_text()) for f in sorted((out / "chains").glob("*/teacher.json"))
             if chain_kind(json.loads((f.parent / "chain.json").read_text())) == kind]
    out_ = {}
    for concept in HELD_OUT_SHAPES[1:]:
        vals = [t[concept] for t in found if concept in t]
        if vals:
            out_[concept] = {"chains": len(vals), "base": vals[0]["base"],
                             "warm_start": sum(v["warm_start"] for v in vals) / len(vals)}
            plain = [v["warm_start_without_prior"] for v in vals if "warm_start_without_prior" in v]
            if plain:
                out_[concept]["warm_start_without_prior"] = sum(plain) / len(plain)
    return out_


def chain_summary(chains: list[dict], single: dict[tuple[str, str, int], float]) -> dict:
    """Per variant, means over seeds after each stage, and at the end each concept's kept share.
    single: (concept, method, seed) -> fidelity of the concept's own run at the chain's step count."""
    out = {}
    sft = [c for c in chains if c["variant"] == "sft + prior"]
    for variant in VARIANTS:
        rs = [c for c in chains if c["variant"] == variant]
        if not rs:
            continue
        n_stages = min(len(c["stages"]) for c in rs)
        stages = []
        for i in range(n_stages):
            concepts = list(rs[0]["stages"][i]["concepts"])
            stages.append({"concept": rs[0]["stages"][i]["concept"],
                           "retention": sum(c["stages"][i]["retention"] for c in rs) / len(rs),
                           "fidelity": {k: sum(c["stages"][i]["concepts"][k]["concept_fidelity"] for c in rs) / len(rs)
                                        for k in concepts},
                           "leak": sum(c["stages"][i]["concepts"][concepts[-1]]["leak"] for c in rs) / len(rs)})
        end, kept = stages[-1], {}
        for k in end["fidelity"]:
            ref = [single.get((k, rs[0]["method"], c["seed"])) for c in rs]
            if all(v is not None for v in ref) and sum(ref) > 0:
                kept[k] = {"single_run": sum(ref) / len(ref), "after_chain": end["fidelity"][k],
                           "kept_share": end["fidelity"][k] / (sum(ref) / len(ref))}
        out[variant] = {"seeds": len(rs), "stages": stages, "kept": kept,
                        "model_evals": sum(c["model_evals"] for c in rs) / len(rs)}
        if sft and variant != "sft + prior":
            out[variant]["minus_sft"] = end_difference(rs, sft)
    ema = [c for c in chains if c["variant"] == "dopsd + prior"]
    base = [c for c in chains if c["variant"] == "dopsd + prior, base teacher"]
    if ema and base:  # the teacher choice for warm-started stages
        out["dopsd + prior, base teacher"]["minus_ema_teacher"] = end_difference(base, ema)
    return out


def end_difference(a: list[dict], b: list[dict]) -> dict:
    """Per concept, the fidelity at the end of chains a minus chains b, with its bootstrap interval (seeds,
    then prompts)."""
    ends = [[c["stages"][-1]["concepts"] for c in rs] for rs in (a, b)]
    return {k: bootstrap_difference(*[[per_prompt(e[k]["fid_hits"], FIDELITY_SEEDS) for e in es] for es in ends])
            for k in ends[0][0] if all(k in e for es in ends for e in es)}

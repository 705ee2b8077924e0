"""The trade-off study on the toy: how much of a concept each method learns for how much of everything
else it keeps, along each run, at 4 steps.

Variants: D-OPSD and SFT, each without and with prior preservation (auto prompts, lambda 1, 4 prior
samples per step). Every run saves a LoRA every 10 steps; the ones at CHECKPOINTS are evaluated at 4
steps (toy/metrics.py: fidelity on 96 samples, retention and leak on the 192 evaluation prompts,
cross_token, and retention on a separate selection set used only to pick points).

Stages (each resumable: finished runs and evaluated checkpoints are cached under OUT/runs/):
  prune  the star, seed 0, rank 16: every variant at lr 1e-4, 3e-4 and 1e-3 -> the lr kept per variant
  main   the kept lr per variant x 3 concepts x 3 seeds, rank 16; and rank 3 (1.9 % of the toy's width,
         like the paper's rank 64 on its models) for the star
A matched point at tau is the checkpoint with the best fidelity whose selection-set retention is >= tau.
Compute is counted in model evaluations (a forward or a backward of one sample), not in seconds.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import DopsdError
from ..fileio import save_bytes, save_json
from .denoiser import BASE_WEIGHTS, load_toy_file
from .evaluator import load_evaluator
from .metrics import ToyMetrics, concept_training_set, generate, hit_string
from .render import HELD_OUT_SHAPES
from .runs import TOY_BUDGET, auto_prior, load_with_lora, train_concept
from .text import BACKGROUNDS, COLOURS, SEEN_SHAPES

CHECKPOINTS = (10, 20, 40, 80, 140, 200)
LRS = (1e-4, 3e-4, 1e-3)
VARIANTS = (("dopsd", False), ("dopsd", True), ("sft", False), ("sft", True))
TAUS = (0.8, 0.7, 0.6)
PRIOR = dict(prior_weight=1.0, prior_batch=4)
SMALL_RANK = 3
N_UNRELATED = 192  # the evaluation set of retention and leak (toy/metrics.py)


@dataclass(frozen=True)
class StudyRun:
    concept: str
    method: str
    prior: bool
    lr: float
    seed: int = 0
    rank: int = 16

    @property
    def name(self) -> str:
        return (f"{self.concept}_{self.method}{'_prior' if self.prior else ''}_lr{self.lr:g}_r{self.rank}"
                f"_s{self.seed}")

    @property
    def variant(self) -> str:
        return f"{self.method}{' + prior' if self.prior else ''}"


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


def evals_per_step(method: str, prior: bool, k: int = 4, batch: int = TOY_BUDGET["batch_size"]) -> int:
    """Model evaluations (one sample's forward or backward) per optimizer step. D-OPSD, all K states:
    K teacher forwards + K student forwards + K backwards per sample; SFT: one forward, one backward."""
    per_sample = 3 * k if method == "dopsd" else 2
    return per_sample * (batch + (PRIOR["prior_batch"] if prior else 0))


def setup_evals(method: str, prior: bool, n_prior_prompts: int, k: int = 4) -> int:
    """One-off evaluations: SFT's prior samples its class images once (K forwards each)."""
    from ..trainer import PRIOR_CLASS_IMAGES
    return max(PRIOR_CLASS_IMAGES, n_prior_prompts) * k if (method == "sft" and prior) else 0


class StudyMetrics(ToyMetrics):
    """ToyMetrics plus the selection set's retention (4 steps only: the checkpoints' metrics)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection = selection_prompts()

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


def run_one(run: StudyRun, out: Path, metrics: StudyMetrics, log=print) -> dict:
    """Train (cached: a finished run is not retrained) and evaluate every checkpoint (cached per step)."""
    run_dir = out / "runs" / run.name
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    train_dir = run_dir / "train"
    prompts = auto_prior(run.concept, out) if run.prior else None
    t0 = time.perf_counter()
    if not (train_dir / f"lora-{CHECKPOINTS[-1]:06d}.safetensors").is_file():
        if train_dir.exists():  # an interrupted run: start it over (it keeps a LoRA per save point)
            import shutil
            shutil.rmtree(train_dir)
        every = CHECKPOINTS[0]
        assert all(c % every == 0 for c in CHECKPOINTS), "checkpoints must be multiples of the first"
        train_concept(run.concept, run.method, train_dir, out, seed=run.seed, lr=run.lr, rank=run.rank,
                      alpha=float(run.rank), steps=CHECKPOINTS[-1], save_every=every, prior_prompts=prompts,
                      **(PRIOR if run.prior else {}))
    train_s = time.perf_counter() - t0
    captions = [caps[0] for caps in concept_training_set(run.concept)[1]]
    per_step = evals_per_step(run.method, run.prior)
    setup = setup_evals(run.method, run.prior, len(prompts or []))
    points = []
    for step in CHECKPOINTS:
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


def matched(points: list[dict], tau: float) -> dict | None:
    """The checkpoint with the best fidelity among those whose selection-set retention is >= tau."""
    ok = [p for p in points if p["retention_selection"] >= tau]
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


def run_study(out: Path, stage: str = "prune", log=print) -> dict:
    out = Path(out)
    base = load_toy_file(BASE_WEIGHTS)
    stamp = {"base": base.fingerprint(), "study": 1}
    stamp_file = out / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) != stamp:
        raise DopsdError(f"{out} holds a study of another toy base ({stamp_file}); use a new --out folder")
    save_json(stamp, stamp_file)
    metrics = StudyMetrics(load_evaluator(), base, n_unrelated=N_UNRELATED)
    prune = [run_one(r, out, metrics, log) for r in prune_plan()]
    if stage == "main":
        kept = {v: c["lr"] for v, c in choose_lr(prune).items()}
        if any(lr is None for lr in kept.values()):
            raise DopsdError(f"no lr gave fidelity at retention >= {TAUS[-1]} for some variant ({kept}); "
                             "see results.md")
        for r in main_plan(kept):
            run_one(r, out, metrics, log)
            report(out)  # after every run: a study cut short still reports what it has
    return report(out)


PAIRS = (("dopsd + prior", "sft + prior"), ("dopsd", "sft"))


def _at(points: list[dict], tau: float) -> dict:
    """The matched point's metrics and fidelity hits; a tau not reached counts as fidelity 0."""
    m = matched(points, tau)
    if m is None:
        n = len(points[0]["hits"]["concept_fidelity"])
        return {"reached": False, "concept_fidelity": 0.0, "fid_hits": "0" * n}
    return {"reached": True, "step": m["step"], "model_evals": m["model_evals"],
            "fid_hits": m["hits"]["concept_fidelity"],
            **{k: m[k] for k in ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")}}


def _mean(points: list[dict], key: str, reached_only: bool) -> float | None:
    values = [p[key] for p in points if p["reached"] or not reached_only]
    return sum(values) / len(values) if values else None


def main_summary(runs: list[dict]) -> dict:
    """Per concept and variant, the matched points of every seed at each tau (means over seeds), and
    D-OPSD minus SFT (with and without prior) with bootstrap intervals over seeds, then prompts."""
    from .metrics import FIDELITY_SEEDS
    from .stats import bootstrap_difference, per_prompt
    out = {}
    for concept in sorted({r["run"]["concept"] for r in runs}):
        by_variant = {}
        for r in runs:
            if r["run"]["concept"] == concept and r["run"]["rank"] != SMALL_RANK:
                by_variant.setdefault(r["variant"], []).append(r)
        entry = {}
        for tau in TAUS:
            at = {v: [_at(r["points"], tau) for r in rs] for v, rs in by_variant.items()}
            row = {v: {"seeds": len(ps), "reached": sum(p["reached"] for p in ps),
                       "concept_fidelity": _mean(ps, "concept_fidelity", reached_only=False),
                       **{k: _mean(ps, k, reached_only=True) for k in ("retention", "leak", "cross_token")}}
                   for v, ps in at.items()}
            for a, b in PAIRS:
                if a in at and b in at:
                    row[f"{a} - {b}"] = bootstrap_difference(
                        *[[per_prompt(p["fid_hits"], FIDELITY_SEEDS) for p in at[v]] for v in (a, b)])
            entry[str(tau)] = row
        out[concept] = entry
    return out


def report(out: Path) -> dict:
    """results.json and results.md from whatever runs are cached (no training): a study spread over
    sessions reports what it has."""
    out = Path(out)
    cached = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}
    prune = [cached[r.name] for r in prune_plan() if r.name in cached]
    summary = {"prune": {"runs": [r["name"] for r in prune], "complete": len(prune) == len(prune_plan())}}
    main = []
    if summary["prune"]["complete"]:
        summary["prune"]["kept_lr"] = choose_lr(prune)
        kept = {v: c["lr"] for v, c in summary["prune"]["kept_lr"].items()}
        if all(lr is not None for lr in kept.values()):
            plan = main_plan(kept)
            main = [cached[r.name] for r in plan if r.name in cached]
            summary["main"] = {"runs": [r["name"] for r in main], "planned": len(plan),
                               "by_concept": main_summary(main)}
    results = {"stamp": json.loads((out / "stamp.json").read_text()), "summary": summary,
               "runs": {r["name"]: r for r in prune + main}}
    save_json(results, out / "results.json")
    save_bytes(study_markdown(results).encode(), out / "results.md")
    return results


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def study_markdown(results: dict) -> str:
    runs = results["runs"]
    lines = ["# Toy trade-off study", "",
             "Generated by `dopsd experiment --stage ...` from results.json; every number below is from it.", "",
             "## Prune (star, seed 0, rank 16): every checkpoint at 4 steps", "",
             "| variant | lr | step | fidelity | retention | selection retention | leak | cross_token | model evals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in results["summary"]["prune"]["runs"]:
        r = runs[name]
        for p in r["points"]:
            lines.append(f"| {r['variant']} | {r['run']['lr']:g} | {p['step']} | {_pct(p['concept_fidelity'])} | "
                         f"{_pct(p['retention'])} | {_pct(p['retention_selection'])} | {_pct(p['leak'])} | "
                         f"{_pct(p['cross_token'])} | {p['model_evals']} |")
    lines += ["", "## Matched points (best fidelity with selection retention >= tau; retention shown on the "
              "evaluation prompts)", "", "| variant | lr | " + " | ".join(f"tau {t}" for t in TAUS) + " |",
              "|---|---|" + "---|" * len(TAUS)]
    for name in results["summary"]["prune"]["runs"]:
        r = runs[name]
        cells = []
        for tau in TAUS:
            m = matched(r["points"], tau)
            cells.append("not reached" if m is None else
                         f"fid {_pct(m['concept_fidelity'])} @{m['step']} (ret {_pct(m['retention'])}, "
                         f"leak {_pct(m['leak'])})")
        lines.append(f"| {r['variant']} | {r['run']['lr']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Kept lr per variant (largest sum of matched fidelities over the taus):", ""]
    if "kept_lr" not in results["summary"]["prune"]:
        return "\n".join(lines[:-2]) + "\n"
    for v, c in results["summary"]["prune"]["kept_lr"].items():
        at = ", ".join(f"tau {t}: {_pct(f)}" for t, f in c["fidelity_at"].items())
        lines.append(f"- {v}: " + ("no lr reached any tau with fidelity > 0" if c["lr"] is None else
                                   f"lr {c['lr']:g} ({at})"))
    main = results["summary"].get("main")
    if main:
        lines += ["", f"## Main: kept lrs, rank 16 ({len(main['runs'])} of {main['planned']} planned runs cached)", "",
                  "Means over the seeds run so far of the matched point per seed (fidelity counts 0 where tau "
                  "is not reached; retention, leak and cross_token are means over the seeds that reached it). "
                  "Differences: D-OPSD minus SFT fidelity, 95 % bootstrap interval over seeds, then prompts.", ""]
        for concept, by_tau in main["by_concept"].items():
            lines += [f"### {concept}", "", "| tau | variant | seeds (reached) | fidelity | retention | leak | "
                      "cross_token |", "|---|---|---|---|---|---|---|"]
            for tau, row in by_tau.items():
                for v, m in row.items():
                    if " - " in v:
                        continue
                    lines.append(f"| {tau} | {v} | {m['seeds']} ({m['reached']}) | {_pct(m['concept_fidelity'])} | "
                                 + (" | ".join(_pct(m[k]) for k in ("retention", "leak", "cross_token"))
                                    if m["reached"] else "– | – | –") + " |")
            lines += ["", "| tau | difference | fidelity difference | 95 % interval |", "|---|---|---|---|"]
            for tau, row in by_tau.items():
                for v, d in row.items():
                    if " - " in v:
                        lines.append(f"| {tau} | {v} | {100 * d['diff']:+.0f} points | "
                                     f"[{100 * d['lo']:+.0f}, {100 * d['hi']:+.0f}] |")
            lines.append("")
    return "\n".join(lines) + "\n"

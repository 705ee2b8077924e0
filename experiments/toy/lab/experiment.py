"""The measured D-OPSD vs SFT experiment on the toy world (resumable: finished runs are cached).

main       each held-out concept x 3 seeds x {SFT, D-OPSD}, equal budget (runs.MAIN_BUDGET, no prior)
ablations  concept 1 x 2 seeds: teacher frozen, velocity weight, one random state, K = 2
           (each against the default D-OPSD runs of the same seeds)
continual  concepts 1 -> 2 -> 3, each warm-started from the previous LoRA (--init-lora; the EMA
           teacher starts from it), then concept 1's fidelity and few_step_gap after concept 3
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from dopsd_core.errors import DopsdError
from dopsd_core.fileio import save_bytes, save_json
from dopsd_core.plot import save_png
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import ToyMetrics, concept_training_set, token_identity
from dopsd_core.toy.render import HELD_OUT_SHAPES
from dopsd_core.toy.runs import train_concept
from .runs import MAIN_BUDGET, load_with_lora
from .stats import bootstrap_difference, per_prompt

# The shipped base's many-step parent (its pretraining's EMA before distillation, docs/toy_training_log.md):
# only the acceptance check reads it, so it lives in the lab, not in the installed package.
UNDISTILLED_WEIGHTS = Path(__file__).parent / "weights" / "toy_undistilled.safetensors"

METRICS = ("concept_fidelity", "retention", "leak", "cross_token", "quality_4", "quality_32", "few_step_gap", "drift")
# compared D-OPSD vs SFT with bootstrap intervals (seeds, then prompts): metric -> samples per prompt in "hits"
COMPARED = {"concept_fidelity": "fidelity_seeds", "retention": None, "leak": None, "cross_token": None}
ABLATIONS = {"teacher_frozen": {"teacher": "frozen"}, "velocity_weight": {"loss_weight": "velocity"},
             "one_state": {"states": "one"}, "k2": {"k": 2}}


@dataclass
class RunSpec:
    name: str
    group: str  # main | ablation | continual
    concept: str
    method: str
    seed: int
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # name of the run whose LoRA warm-starts this one
    also_eval: str | None = None  # continual: also measure this earlier concept


def plan(quick: bool = False) -> list[RunSpec]:
    if quick:  # CI: one concept, one seed, a few steps; every part of the pipeline once
        c = HELD_OUT_SHAPES[0]
        return [RunSpec(f"main_{c}_{m}_s0", "main", c, m, 0, {"steps": 4}) for m in ("sft", "dopsd")] + [
            RunSpec(f"ablation_{c}_k2_s0", "ablation", c, "dopsd", 0, {"steps": 4, "k": 2}),
            RunSpec(f"continual_1_{c}", "continual", c, "dopsd", 0, {"steps": 4}),
            RunSpec(f"continual_2_{HELD_OUT_SHAPES[1]}", "continual", HELD_OUT_SHAPES[1], "dopsd", 0, {"steps": 4},
                    init_from=f"continual_1_{c}", also_eval=c)]
    specs = [RunSpec(f"main_{c}_{m}_s{s}", "main", c, m, s)
             for c in HELD_OUT_SHAPES for s in range(3) for m in ("sft", "dopsd")]
    c1 = HELD_OUT_SHAPES[0]
    specs += [RunSpec(f"ablation_{c1}_{a}_s{s}", "ablation", c1, "dopsd", s, dict(o))
              for a, o in ABLATIONS.items() for s in range(2)]
    prev = None
    for i, c in enumerate(HELD_OUT_SHAPES):
        name = f"continual_{i + 1}_{c}"
        specs.append(RunSpec(name, "continual", c, "dopsd", 0, init_from=prev,
                             also_eval=c1 if i == len(HELD_OUT_SHAPES) - 1 else None))
        prev = name
    return specs


def run_experiment(out: Path, quick: bool = False, log=print) -> dict:
    out = Path(out)
    t_start = time.perf_counter()
    base = load_toy_file(BASE_WEIGHTS)
    # Cached runs are only valid for the base they were trained on, with the same plan
    stamp = {"base": base.fingerprint(), "quick": quick}
    stamp_file = out / "base" / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) != stamp:
        raise DopsdError(f"{out} holds results of another toy base or plan ({stamp_file}); "
                         "use a new --out folder (or delete that one) to run the experiment on this base")
    save_json(stamp, stamp_file)
    # quick (CI) evaluates on small prompt sets: it checks the pipeline, not the numbers
    metrics = ToyMetrics(load_evaluator(), base, **(dict(n_unrelated=12, n_fidelity=6, n_cross=6) if quick else {}))
    captions = {c: [caps[0] for caps in concept_training_set(c)[1]] for c in HELD_OUT_SHAPES}
    base_file = out / "base" / "result.json"
    if not base_file.is_file():
        save_json({c: metrics.evaluate(base, c, captions[c]) for c in HELD_OUT_SHAPES}, base_file)
    results = {"base": json.loads(base_file.read_text()), "runs": {}}
    specs = plan(quick)
    for i, spec in enumerate(specs):
        run_dir = out / "runs" / spec.name
        result_file = run_dir / "result.json"
        if result_file.is_file():
            results["runs"][spec.name] = json.loads(result_file.read_text())
            log(f"[{i + 1}/{len(specs)}] {spec.name}: cached")
            continue
        if run_dir.exists():  # an interrupted run: start it over
            import shutil
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        init = out / "runs" / spec.init_from / "lora.safetensors" if spec.init_from else None
        train_concept(spec.concept, spec.method, run_dir, out, seed=spec.seed, init_lora=init,
                      **{**MAIN_BUDGET, **spec.overrides})
        train_s = time.perf_counter() - t0
        tuned = load_with_lora(run_dir / "lora.safetensors")
        r = {"spec": spec.__dict__, "train_seconds": round(train_s, 1),
             "metrics": metrics.evaluate(tuned, spec.concept, captions[spec.concept])}
        if spec.also_eval:
            r["earlier_concept"] = {"concept": spec.also_eval,
                                    **metrics.evaluate(tuned, spec.also_eval, captions[spec.also_eval])}
        r["total_seconds"] = round(time.perf_counter() - t0, 1)
        save_json(r, result_file)
        results["runs"][spec.name] = r
        shown = {k: round(v, 3) for k, v in r["metrics"].items() if isinstance(v, float)}
        log(f"[{i + 1}/{len(specs)}] {spec.name}: {json.dumps(shown)}")
    results["summary"] = summarise(results, specs)
    results["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results["compute_seconds_all_runs"] = round(sum(r["total_seconds"] for r in results["runs"].values()), 1)
    save_json(results, out / "results.json")
    save_bytes(results_markdown(results).encode(), out / "results.md")
    save_png(results_figure(results), out / "results.png")
    return results


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(results: dict, specs: list[RunSpec]) -> dict:
    runs = results["runs"]
    by = {}
    for s in specs:
        if s.group == "main":
            key = f"main/{s.concept}/{s.method}"
        elif s.group == "ablation":
            key = f"ablation/{s.name.split('_', 2)[2].rsplit('_s', 1)[0]}"
        else:
            continue
        by.setdefault(key, []).append(runs[s.name]["metrics"])
    summary = {k: {m: _mean_std([r[m] for r in rs if m in r]) for m in METRICS if any(m in r for r in rs)}
               for k, rs in by.items()}
    # the ablation reference: default D-OPSD on the ablation concept with the ablation seeds
    seeds = sorted({s.seed for s in specs if s.group == "ablation"})
    c1 = next((s.concept for s in specs if s.group == "ablation"), None)
    ref = [runs[s.name]["metrics"] for s in specs if s.group == "main" and s.concept == c1
           and s.method == "dopsd" and s.seed in seeds]
    if ref:
        summary["ablation/default"] = {m: _mean_std([r[m] for r in ref]) for m in METRICS if all(m in r for r in ref)}
    for c in sorted({s.concept for s in specs if s.group == "main"}):
        pair = {m: [runs[s.name]["metrics"] for s in specs if s.group == "main" and s.concept == c and s.method == m]
                for m in ("dopsd", "sft")}
        if all(pair.values()) and all("hits" in r for rs in pair.values() for r in rs):
            summary[f"main/{c}/dopsd_minus_sft"] = {m: bootstrap_difference(*[
                [per_prompt(r["hits"][m], r["hits"][k] if k else 1) for r in pair[meth]] for meth in ("dopsd", "sft")])
                for m, k in COMPARED.items()}
    last = [s for s in specs if s.group == "continual" and s.also_eval]
    if last:
        r = runs[last[0].name]
        summary["continual"] = {"last_concept": last[0].concept, "last_concept_fidelity": r["metrics"]["concept_fidelity"],
                                "first_concept": r["earlier_concept"]["concept"],
                                "first_concept_fidelity_after": r["earlier_concept"]["concept_fidelity"],
                                "few_step_gap_after": r["metrics"]["few_step_gap"],
                                "retention_after": r["metrics"]["retention"]}
    return summary


def _fmt(ms: dict | None, pct: bool = False) -> str:
    if not ms:
        return "–"
    if pct:
        return f"{100 * ms['mean']:.0f} ± {100 * ms['std']:.0f}%"
    return f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def main_table(results: dict) -> list[str]:
    """The main table's markdown lines: the base and both methods per concept."""
    s = results["summary"]
    lines = ["| concept | method | concept_fidelity | retention | quality_4 | quality_32 | few_step_gap | drift |",
             "|---|---|---|---|---|---|---|---|"]
    for c in HELD_OUT_SHAPES:
        b = results["base"].get(c)
        if b:
            lines.append(f"| {c} | base | {100 * b['concept_fidelity']:.0f}% | {100 * b['retention']:.0f}% | "
                         f"{b['quality_4']:.2f} | {b['quality_32']:.2f} | {b['few_step_gap']:.2f} | 0 |")
        for m in ("sft", "dopsd"):
            row = s.get(f"main/{c}/{m}")
            if row:
                lines.append(f"| {c} | {m} | {_fmt(row.get('concept_fidelity'), True)} | {_fmt(row.get('retention'), True)} | "
                             f"{_fmt(row.get('quality_4'))} | {_fmt(row.get('quality_32'))} | "
                             f"{_fmt(row.get('few_step_gap'))} | {_fmt(row.get('drift'))} |")
    return lines


def ablation_table(results: dict) -> list[str]:
    """The ablations' markdown lines (default first), or none."""
    abl = {k: v for k, v in results["summary"].items() if k.startswith("ablation/")}
    if not abl:
        return []
    lines = ["| variant | concept_fidelity | retention | quality_4 | few_step_gap | drift |", "|---|---|---|---|---|---|"]
    for k, row in sorted(abl.items(), key=lambda kv: kv[0] != "ablation/default"):
        lines.append(f"| {k.split('/', 1)[1]} | {_fmt(row.get('concept_fidelity'), True)} | "
                     f"{_fmt(row.get('retention'), True)} | {_fmt(row.get('quality_4'))} | "
                     f"{_fmt(row.get('few_step_gap'))} | {_fmt(row.get('drift'))} |")
    return lines


def continual_line(results: dict) -> str | None:
    c = results["summary"].get("continual")
    if c is None:
        return None
    return (f"After training {c['last_concept']} last (warm-started through the chain): "
            f"{c['first_concept']} fidelity {100 * c['first_concept_fidelity_after']:.0f}%, "
            f"{c['last_concept']} fidelity {100 * c['last_concept_fidelity']:.0f}%, "
            f"few_step_gap {c['few_step_gap_after']:.2f}, retention {100 * c['retention_after']:.0f}%.")


def results_markdown(results: dict) -> str:
    lines = ["# D-OPSD vs SFT on the toy turbo model", "",
             "Mean ± std over seeds. fidelity/retention: higher is better; quality (toy-FID), gap, drift: lower is better.",
             "", "## Main table", "", *main_table(results)]
    if ablations := ablation_table(results):
        lines += ["", "## Ablations (concept 1)", "", *ablations]
    if continual := continual_line(results):
        lines += ["", "## Continual tuning", "", continual]
    lines += ["", f"Compute of all runs: {results['compute_seconds_all_runs'] / 60:.1f} min on this machine."]
    return "\n".join(lines) + "\n"


def results_figure(results: dict, width: int = 720, height: int = 300) -> Image.Image:
    """Bars per concept: fidelity and retention (%) for SFT vs D-OPSD, and few_step_gap."""
    s = results["summary"]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    panels = (("concept_fidelity", 1.0, True), ("retention", 1.0, True), ("few_step_gap", None, False))
    pw = width // len(panels)
    colours = {"sft": (220, 120, 60), "dopsd": (40, 90, 190)}
    for p, (metric, vmax, pct) in enumerate(panels):
        x0 = p * pw + 30
        d.text((x0, 5), metric, fill=(0, 0, 0))
        vals = [(c, m, s.get(f"main/{c}/{m}", {}).get(metric)) for c in HELD_OUT_SHAPES for m in ("sft", "dopsd")]
        vals = [(c, m, v["mean"]) for c, m, v in vals if v]
        top = vmax or max([abs(v) for *_, v in vals] + [1e-6])
        for i, (c, m, v) in enumerate(vals):
            bx = x0 + i * ((pw - 40) // max(1, len(vals)))
            bh = int((height - 70) * max(0.0, v) / top)
            d.rectangle([bx, height - 40 - bh, bx + 14, height - 40], fill=colours[m])
            if i % 2 == 0:
                d.text((bx, height - 35), c[:5], fill=(0, 0, 0))
        d.text((x0, height - 18), "orange: SFT  blue: D-OPSD", fill=(0, 0, 0))
    return img


def acceptance(n_unrelated: int = 192, seeds: int = 2) -> dict:
    """The shipped base's acceptance numbers: 4-step retention; distillation is real (undistilled
    4-step toy-FID / distilled 4-step toy-FID, the undistilled model sampled both without guidance
    and with the guidance its distillation used); teacher concept_fidelity per held-out shape; token
    identity (per concept token, the share of its prompts drawn with its own outline)."""
    from dopsd_core.fileio import load_tensors
    from dopsd_core.toy.denoiser import Guided
    base, undistilled = load_toy_file(BASE_WEIGHTS), load_toy_file(UNDISTILLED_WEIGHTS)
    guidance = float(load_tensors(BASE_WEIGHTS)[1].get("dopsd.guidance", "1.0"))
    metrics = ToyMetrics(load_evaluator(), base, n_unrelated=n_unrelated)
    dist, undist = metrics.evaluate(base), metrics.evaluate(undistilled)
    undist_guided = metrics.evaluate(Guided(undistilled, guidance))
    teacher = {}
    for shape in HELD_OUT_SHAPES:
        images, captions = concept_training_set(shape)
        teacher[shape] = metrics.teacher_fidelity(base, shape, images, captions, seeds=seeds)
    return {"distilled": dist, "undistilled": undist, f"undistilled_guidance_{guidance:g}": undist_guided,
            "fid_ratio_undistilled_over_distilled_4step": undist["quality_4"] / max(dist["quality_4"], 1e-9),
            "fid_ratio_guided_undistilled_over_distilled_4step":
                undist_guided["quality_4"] / max(dist["quality_4"], 1e-9),
            "teacher_concept_fidelity": teacher, "token_identity": token_identity(base, n=48)}

"""The levers stage's analysis: what each lever on a D-OPSD + prior step's cost buys, against model evaluations.

A cell is one setting (a run variant: the defaults, a lever, SFT + prior) at one checkpoint, averaged over
its concepts x seeds. With a constant lr a checkpoint at step s is the s-step run, so every checkpoint is
a candidate step count. The defaults' rule (AIMS below): the D-OPSD cell with the fewest model evaluations
whose mean fidelity, retention and leak meet the aims, every concept's mean fidelity included. Equal
compute: at that cell's evaluations, each D-OPSD run's matched point against the SFT + prior run of the
same concept and seed, both limited to checkpoints within those evaluations.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from dopsd_core.toy.metrics import FIDELITY_SEEDS
from dopsd_core.toy.render import HELD_OUT_SHAPES
from .stats import bootstrap_difference, per_prompt
from .study import ORIGIN, evals_per_step, matched, setup_evals

DEFAULTS = "dopsd + prior"  # the budget stage's D-OPSD + prior runs: today's defaults and every lever's origin
SFT = "sft + prior"
AIMS = {"fidelity": 0.80, "each concept": 0.80, "retention": 0.85, "leak": 0.05}
EQUAL_COMPUTE_TAU = 0.8
METRICS = ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")


def cells(runs: list[dict]) -> list[dict]:
    """Every (variant, step) that all of its variant's runs evaluated: means over those runs, each
    concept's mean fidelity, and the mean model evaluations spent up to that step."""
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    out = []
    for variant, rs in by_variant.items():
        steps = set.intersection(*({p["step"] for p in r["points"]} for r in rs))
        for step in sorted(steps):
            pts = [(r["run"]["concept"], next(p for p in r["points"] if p["step"] == step)) for r in rs]
            by_concept = {}
            for c, p in pts:
                by_concept.setdefault(c, []).append(p["concept_fidelity"])
            out.append({"variant": variant, "step": step, "runs": len(pts),
                        "seeds": sorted({r["run"]["seed"] for r in rs}),
                        "model_evals": sum(p["model_evals"] for _, p in pts) / len(pts),
                        "evals_per_step": rs[0]["evals_per_step"],
                        "fidelity_by_concept": {c: sum(v) / len(v) for c, v in sorted(by_concept.items())},
                        **{k: sum(p[k] for _, p in pts) / len(pts) for k in METRICS}})
    return out


def complete(cell: dict) -> bool:
    """All three held-out concepts, three seeds each: the rule's sample."""
    return set(cell["fidelity_by_concept"]) == set(HELD_OUT_SHAPES) and cell["runs"] >= 3 * len(HELD_OUT_SHAPES)


def meets(cell: dict, each_concept: bool = True) -> bool:
    ok = (cell["concept_fidelity"] >= AIMS["fidelity"] and cell["retention"] >= AIMS["retention"]
          and cell["leak"] <= AIMS["leak"])
    return ok and (not each_concept or min(cell["fidelity_by_concept"].values()) >= AIMS["each concept"])


def cheapest(cells: list[dict]) -> dict | None:
    """The cell with the fewest model evaluations (the higher fidelity on a tie); None for no cells."""
    return min(cells, key=lambda c: (c["model_evals"], -c["concept_fidelity"])) if cells else None


def pick(all_cells: list[dict]) -> dict:
    """The rule's choice among complete D-OPSD cells: the cheapest meeting every aim (each concept
    included); the cheapest meeting the mean aims; and, when none meets every aim, the best found: the
    highest worst-concept fidelity among the cells that keep retention and leak."""
    dopsd = [c for c in all_cells if complete(c) and c["variant"].startswith("dopsd")]
    kept = [c for c in dopsd if c["retention"] >= AIMS["retention"] and c["leak"] <= AIMS["leak"]]
    best = max(kept, key=lambda c: (min(c["fidelity_by_concept"].values()), c["concept_fidelity"])) if kept else None
    return {"every_aim": cheapest([c for c in dopsd if meets(c)]),
            "mean_aims": cheapest([c for c in dopsd if meets(c, each_concept=False)]),
            "best_worst_concept": best}


def equal_compute(dopsd_runs: list[dict], sft_runs: list[dict], evals: float, tau: float = EQUAL_COMPUTE_TAU) -> dict:
    """Per concept: D-OPSD minus SFT + prior fidelity at the matched point (selection retention >= tau)
    within `evals` model evaluations, paired by seed, with a 95 % bootstrap interval (seeds, then prompts);
    a run that never reaches tau there counts fidelity 0. sft_run_evals: the shortest SFT run (ends before `evals`?)."""
    def at(r):
        m = matched(r["points"], tau, evals)
        return (per_prompt(m["hits"]["concept_fidelity"], FIDELITY_SEEDS) if m
                else [0.0] * (len(r["points"][0]["hits"]["concept_fidelity"]) // FIDELITY_SEEDS)), m
    out = {}
    for concept in HELD_OUT_SHAPES:
        sft = {r["run"]["seed"]: r for r in sft_runs if r["run"]["concept"] == concept}
        pairs = [(r, sft[r["run"]["seed"]]) for r in dopsd_runs if r["run"]["concept"] == concept
                 and r["run"]["seed"] in sft]
        if not pairs:
            continue
        a, b = zip(*[(at(d), at(s)) for d, s in pairs])
        out[concept] = {**bootstrap_difference([x for x, _ in a], [x for x, _ in b]),
                        "dopsd_fidelity": sum(m["concept_fidelity"] if m else 0.0 for _, m in a) / len(a),
                        "sft_fidelity": sum(m["concept_fidelity"] if m else 0.0 for _, m in b) / len(b),
                        "sft_run_evals": min(s["points"][-1]["model_evals"] for _, s in pairs)}  # the shortest
    return out


def lever_summary(levers: list[dict], budget: list[dict], sft_long: list[dict] = ()) -> dict:
    """Cells of every lever, the defaults and SFT + prior (the long runs once all are in, else the budget
    stage's); the rule's pick; equal compute at the pick."""
    dopsd_default = [r for r in budget if r["variant"] == DEFAULTS]
    long_done = len(sft_long) >= 3 * len(HELD_OUT_SHAPES)
    sft = list(sft_long) if long_done else [r for r in budget if r["variant"] == SFT]
    all_cells = cells(levers + dopsd_default + sft)
    chosen = pick(all_cells)
    reference = next((c for c in all_cells if c["variant"] == DEFAULTS and c["step"] == ORIGIN["steps"]), None)
    prompts = max((r["prior_prompts"] for r in dopsd_default), default=0)
    out = {"cells": all_cells, "pick": chosen, "reference": reference, "aims": AIMS,
           "sft_runs": "long" if long_done else "budget", "defaults_cost": defaults_cost(prompts)}
    if long_done:  # SFT + prior given the steps: where it meets every aim too (None: at no step)
        out["sft_every_aim"] = cheapest([c for c in all_cells if c["variant"] == SFT and complete(c) and meets(c)])
    target = chosen["every_aim"] or chosen["mean_aims"]
    if target:
        runs = [r for r in levers + dopsd_default if r["variant"] == target["variant"]]
        out["equal_compute"] = {"variant": target["variant"], "step": target["step"], "model_evals": target["model_evals"],
                                "tau": EQUAL_COMPUTE_TAU, "by_concept": equal_compute(runs, sft, target["model_evals"])}
    return out


def defaults_cost(prior_prompts: int, steps: int = 1000) -> list[dict]:
    """What a run costs in model evaluations at the toy's old defaults (ORIGIN) and at the picked ones (the
    family spec's TOY), D-OPSD + prior and SFT + prior for the same steps: per step (K = 4, the study's batch
    and prior), per run (SFT + prior adds its class images once: K forwards a prior prompt) and for `steps`
    steps. share: of the old defaults' D-OPSD + prior run."""
    from dopsd_core.family_spec import TOY
    rows = []
    for label, s in (("old defaults", ORIGIN), ("new defaults", dict(lr=TOY.lr, rank=TOY.rank, steps=TOY.steps))):
        for method, name in (("dopsd", "D-OPSD + prior"), ("sft", "SFT + prior")):
            per, setup = evals_per_step(method, True), setup_evals(method, True, prior_prompts)
            rows.append({"setting": f"{name}, {label} (lr {s['lr']:g}, rank {s['rank']})", "method": method,
                         "evals_per_step": per, "steps": s["steps"], "run_evals": setup + s["steps"] * per,
                         "evals_at": setup + steps * per, "at_steps": steps})
    for r in rows:
        r["share"] = r["run_evals"] / rows[0]["run_evals"]
    return rows


COLOURS = [(20, 160, 200), (190, 40, 60), (40, 90, 190), (230, 150, 30), (120, 60, 170), (60, 150, 60),
           (200, 80, 160), (110, 110, 110), (150, 100, 40), (0, 0, 0), (100, 180, 180)]


def levers_figure(all_cells: list[dict], width: int = 900, height: int = 330) -> Image.Image:
    """Three panels against model evaluations (log scale): mean fidelity, the star's fidelity, retention;
    one line per setting through its checkpoints; grey: the aims."""
    variants = list(dict.fromkeys(c["variant"] for c in all_cells))
    img = Image.new("RGB", (width, height + 20 * (1 + len(variants) // 3)), "white")
    d = ImageDraw.Draw(img)
    xs = [c["model_evals"] for c in all_cells if c["model_evals"] > 0]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    panels = (("mean fidelity", lambda c: c["concept_fidelity"], AIMS["fidelity"]),
              ("star fidelity", lambda c: c["fidelity_by_concept"].get("star"), AIMS["each concept"]),
              ("retention", lambda c: c["retention"], AIMS["retention"]))
    pw = width // len(panels)
    for i, (title, value, aim) in enumerate(panels):
        x0, y0, w, h = i * pw + 35, 20, pw - 50, height - 60
        d.rectangle([x0, y0, x0 + w, y0 + h], outline=(150, 150, 150))
        d.line([(x0, y0 + (1 - aim) * h), (x0 + w, y0 + (1 - aim) * h)], fill=(210, 210, 210))
        d.text((x0, 4), f"{title} vs model evaluations", fill=(0, 0, 0))
        d.text((x0 - 12, y0 - 4), "1", fill=(0, 0, 0))
        d.text((x0 - 12, y0 + h - 8), "0", fill=(0, 0, 0))
        d.text((x0, y0 + h + 3), f"{10 ** lo:.0f}", fill=(0, 0, 0))
        d.text((x0 + w - 40, y0 + h + 3), f"{10 ** hi:.0f}", fill=(0, 0, 0))
        for j, v in enumerate(variants):
            pts = [(x0 + (math.log10(c["model_evals"]) - lo) / max(hi - lo, 1e-9) * w, y0 + (1 - value(c)) * h)
                   for c in all_cells if c["variant"] == v and c["model_evals"] > 0 and value(c) is not None]
            colour = COLOURS[j % len(COLOURS)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for j, v in enumerate(variants):
        d.text((35 + (j % 3) * pw, height + 20 * (j // 3)), v, fill=COLOURS[j % len(COLOURS)])
    return img

"""The trade-off study's report: results.json, results.md, fronts.png and the README's results section,
all computed from the cached runs (no training), so a study spread over sessions reports what it has."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from dopsd_core.fileio import save_bytes, save_json
from dopsd_core.plot import save_png
from dopsd_core.toy.metrics import FIDELITY_SEEDS
from dopsd_core.toy.render import HELD_OUT_SHAPES
from dopsd_core.family_spec import TOY
from .chains import chain_kind, chain_plan, chain_summary, teacher_summary
from .levers import (AIMS as LEVER_AIMS, EQUAL_COMPUTE_TAU, complete, equal_compute, lever_summary, levers_figure,
                     meets)
from .stats import bootstrap_difference, per_prompt
from .study import (ADAPTER_SETTINGS, BUDGET, CHECKPOINTS, DEFAULTS_SETTING, ORIGIN, PRIOR, SFT_LONG, SFT_LONG_FIRST,
                    SMALL_RANK, TAUS, adapter_plan, budget_plan, choose_lr, combo_plan, lambda_plan, lever_plan,
                    main_plan, matched, one_state_plan, prune_plan, sft_long_plan)

PAIRS = (("dopsd + prior", "sft + prior"), ("dopsd", "sft"))
ONE_STATE = "dopsd + prior, one state"
ONE_STATE_PAIRS = ((ONE_STATE, "sft + prior"),)
AIMS = {"concept_fidelity": (">=", 0.80), "retention": (">=", 0.85), "leak": ("<=", 0.05)}
DEFAULT_TAU = 0.7  # the default is the best mean fidelity whose mean selection retention is >= this
TEACHER_NOTE = ("Teacher fidelity on each warm-started stage's new concept (its target in context, 4 steps), in the "
                "D-OPSD + prior chains whose teacher is the EMA of the warm start:")


def _at(points: list[dict], tau: float, max_evals: int | None = None) -> dict:
    """The matched point's metrics and fidelity hits; a tau not reached counts as fidelity 0."""
    m = matched(points, tau, max_evals)
    if m is None:
        n = len(points[0]["hits"]["concept_fidelity"])
        return {"reached": False, "concept_fidelity": 0.0, "fid_hits": "0" * n}
    return {"reached": True, "step": m["step"], "model_evals": m["model_evals"],
            "fid_hits": m["hits"]["concept_fidelity"],
            **{k: m[k] for k in ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")}}


def _mean(points: list[dict], key: str, reached_only: bool) -> float | None:
    values = [p[key] for p in points if p["reached"] or not reached_only]
    return sum(values) / len(values) if values else None


def _difference(a: list[dict], b: list[dict]) -> dict:
    return bootstrap_difference(*[[per_prompt(p["fid_hits"], FIDELITY_SEEDS) for p in ps] for ps in (a, b)])


def main_summary(runs: list[dict], pairs=PAIRS) -> dict:
    """Per concept and tau: each variant's matched points (means over seeds); D-OPSD minus SFT fidelity
    (with and without the prior) with bootstrap intervals over seeds, then prompts, at equal steps (both
    runs' whole length) and at equal compute (D-OPSD's checkpoints within the SFT run's model evaluations,
    same seed)."""
    out = {}
    for concept in sorted({r["run"]["concept"] for r in runs}):
        by_variant = {}
        for r in sorted(runs, key=lambda r: r["run"]["seed"]):
            if r["run"]["concept"] == concept and r["run"]["rank"] != SMALL_RANK:
                by_variant.setdefault(r["variant"], []).append(r)
        entry = {}
        for tau in TAUS:
            at = {v: [_at(r["points"], tau) for r in rs] for v, rs in by_variant.items()}
            row = {v: {"seeds": len(ps), "reached": sum(p["reached"] for p in ps),
                       "concept_fidelity": _mean(ps, "concept_fidelity", reached_only=False),
                       **{k: _mean(ps, k, reached_only=True) for k in ("retention", "leak", "cross_token")}}
                   for v, ps in at.items()}
            for a, b in pairs:
                if a not in at or b not in at:
                    continue
                row[f"{a} - {b}"] = _difference(at[a], at[b])
                sft_budget = {r["run"]["seed"]: r["points"][-1]["model_evals"] for r in by_variant[b]}
                seeds = sft_budget.keys() & {r["run"]["seed"] for r in by_variant[a]}
                equal = [_at(r["points"], tau, sft_budget[r["run"]["seed"]]) for r in by_variant[a]
                         if r["run"]["seed"] in seeds]
                paired = [p for r, p in zip(by_variant[b], at[b]) if r["run"]["seed"] in seeds]
                if seeds:
                    row[f"{a} - {b}, equal compute"] = {**_difference(equal, paired),
                                                        "dopsd_fidelity": _mean(equal, "concept_fidelity", False)}
            entry[str(tau)] = row
        out[concept] = entry
    return out


def _cells(runs: list[dict]) -> dict:
    """(variant, lr, step) -> every rank-16 run's point there, as (concept, point)."""
    cells = {}
    for r in runs:
        if r["run"]["rank"] == SMALL_RANK:
            continue
        for p in r["points"]:
            cells.setdefault((r["variant"], r["run"]["lr"], p["step"]), []).append((r["run"]["concept"], p))
    return cells


def _cell_mean(variant: str, lr: float, step: int, cps: list) -> dict:
    return {"variant": variant, "lr": lr, "step": step, "runs": len(cps),
            **{k: sum(p[k] for _, p in cps) / len(cps)
               for k in ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")}}


def default_choice(runs: list[dict], tau: float = DEFAULT_TAU) -> dict | None:
    """The variant and checkpoint with the best fidelity, averaged over every concept and seed, whose
    averaged selection retention is >= tau. Needs every concept."""
    best = None
    for (variant, lr, step), cps in _cells(runs).items():
        if len({c for c, _ in cps}) < 3:
            continue
        mean = _cell_mean(variant, lr, step, cps)
        if mean["retention_selection"] >= tau and (best is None or mean["concept_fidelity"] > best["concept_fidelity"]):
            best = mean
    return best


def _settings(run: dict) -> tuple:
    """What a study run trained with, in the toy spec's terms (a run's 0 prior batch is PRIOR's)."""
    r = run["run"]
    return (r["method"], r["prior"], r.get("prior_weight", PRIOR["prior_weight"]), r.get("adapter", "lora"), r["lr"],
            r["rank"], r.get("states", "all"), r.get("prior_every", 1), r.get("prior_states", "same"),
            r.get("prior_batch", 0) or PRIOR["prior_batch"])


def longest(runs: list[dict]) -> list[dict]:
    """Of runs with the same settings, concept and seed (a combination that runs a lever's settings longer),
    the one that ran the most steps: with a constant lr its step-s checkpoint is an s-step run of the same
    setting, so it stands for the shorter run (which the levers stage trained first)."""
    keep: dict[tuple, dict] = {}
    for r in runs:
        key = (r["variant"], r["run"]["concept"], r["run"]["seed"], _settings(r))
        if key not in keep or r["points"][-1]["step"] > keep[key]["points"][-1]["step"]:
            keep[key] = r
    return [r for r in runs if keep[(r["variant"], r["run"]["concept"], r["run"]["seed"], _settings(r))] is r]


def shipped_point(runs: list[dict]) -> dict | None:
    """The toy's shipped defaults (its family spec, TOY) measured: the mean over every concept and seed of
    the D-OPSD + prior runs that trained with exactly those settings, at the defaults' step count, if the
    runs evaluated it for every concept (a checkpoint is the run of that many steps: constant lr)."""
    shipped = _shipped_runs(runs)
    cps = [(r["run"]["concept"], p) for r in shipped for p in r["points"] if p["step"] == TOY.steps]
    if len({c for c, _ in cps}) < 3:
        return None
    return {**_cell_mean(shipped[0]["variant"], TOY.lr, TOY.steps, cps),
            "model_evals": sum(p["model_evals"] for _, p in cps) / len(cps)}


def _shipped_runs(runs: list[dict]) -> list[dict]:
    """The D-OPSD + prior runs that trained with exactly the toy spec's settings."""
    want = ("dopsd", True, TOY.prior_weight, "lora", TOY.lr, TOY.rank, TOY.states, TOY.prior_every, TOY.prior_states,
            TOY.prior_batch)
    return [r for r in runs if _settings(r) == want]


def shipped_equal_compute(runs: list[dict], shipped: dict | None, sft_long: list[dict]) -> dict | None:
    """D-OPSD + prior at the toy's defaults minus SFT + prior limited to the same model evaluations (the
    defaults' step count's), per concept at retention EQUAL_COMPUTE_TAU; None until the long SFT runs are in."""
    if shipped is None or len(sft_long) < 3 * len(HELD_OUT_SHAPES):
        return None
    return {"model_evals": shipped["model_evals"], "step": shipped["step"], "tau": EQUAL_COMPUTE_TAU,
            "by_concept": equal_compute(_shipped_runs(runs), sft_long, shipped["model_evals"])}


BEST_TAUS = (0.85, 0.8, 0.7)


def best_found(runs: list[dict]) -> dict:
    """At each retention level, the single best checkpoint of any main run (selection retention >= tau):
    the best point the study found, whatever it cost."""
    out = {}
    for tau in BEST_TAUS:
        cands = [(r["name"], p) for r in runs for p in r["points"] if p["retention_selection"] >= tau]
        if cands:
            name, p = max(cands, key=lambda c: (c[1]["concept_fidelity"], c[1]["retention_selection"]))
            out[str(tau)] = {"run": name, "step": p["step"],
                             **{k: p[k] for k in ("concept_fidelity", "retention", "leak", "cross_token")}}
    return out


def gap_summary(out: Path, main: list[dict]) -> dict:
    """Per variant and tau, the mean 4-/32-step toy-FID at the matched points the gap stage measured."""
    base_file = out / "base_gap.json"
    if not base_file.is_file():
        return {}
    res = {"base": json.loads(base_file.read_text()), "variants": {}}
    for tau in TAUS:
        for r in main:
            if r["run"]["rank"] == SMALL_RANK or (m := matched(r["points"], tau)) is None:
                continue
            f = out / "runs" / r["name"] / "eval" / f"gap-{m['step']:06d}.json"
            if f.is_file():
                res["variants"].setdefault(r["variant"], {}).setdefault(str(tau), []).append(json.loads(f.read_text()))
    for v, by_tau in res["variants"].items():
        for tau, gs in by_tau.items():
            by_tau[tau] = {"points": len(gs), **{k: sum(g[k] for g in gs) / len(gs)
                                                 for k in ("quality_4", "quality_32", "few_step_gap")}}
    return res


def _single_fidelity(runs: list[dict], step: int | None = None) -> dict:
    """(concept, method, seed) -> a prior run's fidelity at `step` (default: its last checkpoint)."""
    def at(r: dict) -> dict:
        return next(p for p in r["points"] if p["step"] == step) if step else r["points"][-1]
    return {(r["run"]["concept"], r["run"]["method"], r["run"]["seed"]): at(r)["concept_fidelity"]
            for r in runs if r["run"]["prior"] and r["run"]["rank"] != SMALL_RANK}


ADAPTER_METRICS = (("concept_fidelity", FIDELITY_SEEDS), ("retention", 1), ("leak", 1), ("cross_token", 1))


def _point_at(run: dict, step: int) -> dict | None:
    return next((p for p in run["points"] if p["step"] == step), None)


def adapter_summary(adapters: list[dict], lora: list[dict]) -> dict:
    """Each adapter's mean metrics at the defaults' last step over concepts x seeds, and its difference to
    LoRA's runs at that step per metric (95 % bootstrap interval over the runs, then the prompts)."""
    step = ORIGIN["steps"]

    def key(r):  # the (concept, seed) a run trained; LoRA is compared on the same ones
        return r["run"].get("concept"), r["run"].get("seed")
    lora_at = {key(r): p for r in lora if (p := _point_at(r, step))}
    arms = {"lora": [(k, p) for k, p in lora_at.items()]}
    for name in ADAPTER_SETTINGS:
        arms[name] = [(key(r), p) for r in adapters if r["run"]["adapter"] == name and (p := _point_at(r, step))]
    out = {"step": step, "arms": {}}
    for name, keyed in arms.items():
        points = [p for _, p in keyed]
        if not points:
            continue
        entry = {"runs": len(points), **{m: sum(p[m] for p in points) / len(points) for m, _ in ADAPTER_METRICS}}
        paired = [lora_at[k] for k, _ in keyed if k in lora_at]
        if name != "lora" and paired:
            entry["lora_runs_compared"] = len(paired)
            entry["minus_lora"] = {m: bootstrap_difference([per_prompt(p["hits"][m], k) for p in points],
                                                           [per_prompt(p["hits"][m], k) for p in paired])
                                   for m, k in ADAPTER_METRICS}
        out["arms"][name] = entry
    return out


def adapter_lines(a: dict) -> list[str]:
    rows = []
    for name, e in a["arms"].items():
        setting = "rank 16" if name == "lora" else ", ".join(f"{k.replace('lokr_', '')} {v}"
                                                             for k, v in ADAPTER_SETTINGS[name].items())
        rows.append([f"{name} ({setting})", e["runs"], *(_pct(e[m]) for m, _ in ADAPTER_METRICS),
                     *((_interval(e["minus_lora"][m]) for m, _ in ADAPTER_METRICS) if "minus_lora" in e
                       else ["", "", "", ""])])
    return _table(["adapter", "runs", "fidelity", "retention", "leak", "cross-token", "fidelity − LoRA",
                   "retention − LoRA", "leak − LoRA", "cross-token − LoRA"], rows)


def _sft_long_plans() -> list:
    return sft_long_plan() + sft_long_plan(SFT_LONG_FIRST)


def _sft_long(cached: dict) -> list[dict]:
    """The long SFT + prior runs: the 3000-step ones where in, else the first 1200-step ones."""
    return longest([cached[r.name] for r in _sft_long_plans() if r.name in cached])


def report(out: Path) -> dict:
    """results.json, results.md and fronts.png from whatever runs are cached."""
    out = Path(out)
    cached = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}
    prune = [cached[r.name] for r in prune_plan() if r.name in cached]
    summary = {"prune": {"runs": [r["name"] for r in prune], "complete": len(prune) == len(prune_plan())}}
    main, lam, one = [], [], []
    budget = [cached[r.name] for r in budget_plan() if r.name in cached]
    adapters = [cached[r.name] for r in adapter_plan() if r.name in cached]
    if adapters:
        summary["adapters"] = {"runs": [r["name"] for r in adapters], "planned": len(adapter_plan()),
                               **adapter_summary(adapters, [r for r in budget if r["variant"] == "dopsd + prior"])}
    levers = [cached[r.name] for r in lever_plan() + combo_plan() if r.name in cached]  # combinations alike
    kept_levers, sft_long = longest(levers), _sft_long(cached)
    if levers:
        summary["levers"] = {"runs": [r["name"] for r in levers], "planned": len(lever_plan() + combo_plan()),
                             "sft_long_runs": [r["name"] for r in sft_long], "sft_long_planned": len(sft_long_plan()),
                             "sft_long_steps": max((r["points"][-1]["step"] for r in sft_long), default=0),
                             **lever_summary(kept_levers, budget, sft_long)}
    all_chains = [json.loads(p.read_text()) for p in sorted((out / "chains").glob("*/chain.json"))]
    if budget:
        summary["budget"] = {"runs": [r["name"] for r in budget], "planned": len(budget_plan()),
                             "by_concept": main_summary(budget, PAIRS[:1]), "default": default_choice(budget),
                             "shipped": shipped_point(budget + kept_levers)}
        summary["budget"]["shipped_equal_compute"] = shipped_equal_compute(
            budget + kept_levers, summary["budget"]["shipped"], sft_long)
        chains = [c for c in all_chains if chain_kind(c) == "budget"]
        if chains:  # kept shares against the budget runs' last step, the chain stages' length
            summary["budget"]["chains"] = chain_summary(chains, _single_fidelity(budget, chains[0]["steps_per_stage"]))
            summary["budget"]["chain_teachers"] = teacher_summary(out, budget=True)
            summary["budget"]["chain_steps"] = chains[0]["steps_per_stage"]
    if summary["prune"]["complete"]:
        summary["prune"]["kept_lr"] = choose_lr(prune)
        kept = {v: c["lr"] for v, c in summary["prune"]["kept_lr"].items()}
        if all(lr is not None for lr in kept.values()):
            plan = main_plan(kept)
            main = [cached[r.name] for r in plan if r.name in cached]
            summary["main"] = {"runs": [r["name"] for r in main], "planned": len(plan),
                               "by_concept": main_summary(main), "default": default_choice(main),
                               "best_found": best_found(main)}
            summary["gap"] = gap_summary(out, main)
            chains = [c for c in all_chains if chain_kind(c) == "main"]
            if chains:
                summary["chains"] = chain_summary(chains, _single_fidelity(main))
                summary["chain_teachers"] = teacher_summary(out)
            lam = [cached[r.name] for r in lambda_plan(kept) if r.name in cached]
            if lam:
                summary["lambda"] = {"runs": [r["name"] for r in lam], "planned": len(lambda_plan(kept))}
            one = [cached[r.name] for r in one_state_plan(kept) if r.name in cached]
            if one:
                sft = [r for r in main if r["variant"] == "sft + prior" and r["run"]["rank"] != SMALL_RANK]
                summary["one_state"] = {"runs": [r["name"] for r in one], "planned": len(one_state_plan(kept)),
                                        "by_concept": main_summary(sft + one, ONE_STATE_PAIRS)}
    setting, at = DEFAULTS_SETTING
    chains = [c for c in all_chains if chain_kind(c) == f"{setting}@{at}"] if setting else []
    singles = []
    if chains:  # kept shares against each concept's own run at the setting, the chain stages' length
        plan = chain_plan(setting=setting, at=at)
        singles = [cached[r.name] for r in dict.fromkeys(c.single_run(k, {}) for c in plan for k in HELD_OUT_SHAPES)
                   if r.name in cached]
        summary["defaults_chains"] = {"setting": setting, "chain_steps": at,
                                      "chains": chain_summary(chains, _single_fidelity(singles, at)),
                                      "chain_teachers": teacher_summary(out, kind=f"{setting}@{at}")}
    results = {"stamp": json.loads((out / "stamp.json").read_text()), "summary": summary,
               "runs": {r["name"]: r for r in prune + main + lam + one + budget + adapters + levers + singles
                        + [cached[r.name] for r in _sft_long_plans() if r.name in cached]}}
    save_json(results, out / "results.json")
    save_bytes(study_markdown(results).encode(), out / "results.md")
    if main:
        save_png(fronts_figure(main), out / "fronts.png")
    if levers:
        save_png(levers_figure(summary["levers"]["cells"]), out / "levers.png")
    return results


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _interval(d: dict) -> str:
    return f"{100 * d['diff']:+.0f} [{100 * d['lo']:+.0f}, {100 * d['hi']:+.0f}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _twin(runs, r: dict, **differs) -> dict | None:
    """The run of the same concept, variant and seed as r whose run fields equal `differs` (e.g. another rank)."""
    same = ("concept", "seed")
    return next((m for m in runs if m["variant"] == r["variant"] and all(m["run"][k] == r["run"][k] for k in same)
                 and all(m["run"].get(k, PRIOR.get(k)) == v for k, v in differs.items())), None)


def _point_cells(m: dict | None) -> str:
    return "not reached" if m is None else (f"fid {_pct(m['concept_fidelity'])} @{m['step']} "
                                            f"(ret {_pct(m['retention'])}, leak {_pct(m['leak'])})")


def aims_table(default: dict) -> list[str]:
    def met(k, op, v):
        return default[k] >= v if op == ">=" else default[k] <= v
    return _table(["metric", "aim", "measured"], [
        [k, f"{op} {_pct(v)}", f"{_pct(default[k])} ({'met' if met(k, op, v) else 'not met'})"]
        for k, (op, v) in AIMS.items()])


def best_table(best: dict) -> list[str]:
    keys = ("concept_fidelity", "retention", "leak", "cross_token")
    return _table(["selection retention >=", "run", "step", "fidelity", "retention", "leak", "cross_token"],
                  [[tau, b["run"], b["step"], *(_pct(b[k]) for k in keys)] for tau, b in best.items()])


def differences_table(by_concept: dict) -> list[str]:
    keys = [k for a, b in PAIRS for k in (f"{a} - {b}", f"{a} - {b}, equal compute")]
    return _table(["concept", "tau", "with prior, equal steps", "with prior, equal compute", "no prior, equal steps",
                   "no prior, equal compute"],
                  [[concept, tau, *(_interval(row[k]) if k in row else "–" for k in keys)]
                   for concept, by_tau in by_concept.items() for tau, row in by_tau.items()])


def _matched_cell(m: dict | None) -> str:
    return "–" if m is None else f"{_pct(m['concept_fidelity'])} ({m['reached']}/{m['seeds']})"


def pair_table(by_concept: dict, a: str, b: str, names: tuple[str, str], compute_fidelity: bool = False) -> list[str]:
    """Variant a against b per concept and tau: matched fidelities (seeds that reached tau / seeds) and a - b
    at equal steps and at equal compute (compute_fidelity: with a's fidelity there)."""
    def interval(d):
        if d is None:
            return "–"
        return f"{_interval(d)}; {_pct(d['dopsd_fidelity'])}" if compute_fidelity else _interval(d)
    compute = "equal compute; one state there" if compute_fidelity else "equal compute"
    return _table(["concept", "tau", *names, "equal steps", compute],
                  [[concept, tau, _matched_cell(row.get(a)), _matched_cell(row.get(b)),
                    _interval(row[f"{a} - {b}"]) if f"{a} - {b}" in row else "–",
                    interval(row.get(f"{a} - {b}, equal compute"))]
                   for concept, by_tau in by_concept.items() for tau, row in by_tau.items()])


def one_state_table(by_concept: dict) -> list[str]:
    """One-state D-OPSD + prior against SFT + prior (with the one-state fidelity at equal compute)."""
    return pair_table(by_concept, *ONE_STATE_PAIRS[0], ("one state", "SFT + prior"), compute_fidelity=True)


def budget_table(by_concept: dict) -> list[str]:
    """The budget stage's matched points (both variants with the prior) and their differences."""
    return pair_table(by_concept, *PAIRS[0], PAIRS[0])


def _budget_lines(budget: dict) -> list[str]:
    lines = [*budget_table(budget["by_concept"])]
    d = budget.get("default")
    if d:
        lines += ["", f"Best mean fidelity over every concept and seed with mean selection retention >= {DEFAULT_TAU} "
                  f"at this budget: **{d['variant']}, step {d['step']}** ({d['runs']} runs); against the aims:", "",
                  *aims_table(d)]
    shipped = budget.get("shipped")
    if shipped:
        lr = "" if ", lr " in shipped["variant"] else f", lr {shipped['lr']:g}"  # a lever's name may say it
        lines += ["", f"The toy's defaults (its family spec) are {shipped['variant']}{lr}, **step "
                  f"{shipped['step']}** ({shipped['runs']} runs of this stage or the levers'); against the aims:", "",
                  *aims_table(shipped)]
        if budget.get("shipped_equal_compute"):
            lines += ["", *equal_compute_lines(budget["shipped_equal_compute"], "the defaults", "the defaults' step "
                                               f"{shipped['step']}; SFT + prior: the levers stage's long runs")]
    if budget.get("chains"):
        lines += ["", f"Continual chains at the toy's defaults (lr {BUDGET['lr']:g}, star -> heart -> crescent, "
                  f"{budget['chain_steps']} steps per stage); the kept share compares the end of the chain with the "
                  "concept's own budget run at that step (same method and seed):", "", *chains_table(budget["chains"])]
        if budget.get("chain_teachers"):
            lines += ["", TEACHER_NOTE, "",
                      *teacher_table(budget["chain_teachers"])]
    return lines


def fronts_table(by_concept: dict) -> list[str]:
    variants = [v for pair in PAIRS for v in pair]
    return _table(["concept", "tau", *variants],
                  [[concept, tau, *(_matched_cell(row.get(v)) for v in variants)]
                   for concept, by_tau in by_concept.items() for tau, row in by_tau.items()])


def gap_table(gap: dict) -> list[str]:
    def cells(g):
        return [f"{g['quality_4']:.0f}", f"{g['quality_32']:.0f}", f"{g['few_step_gap']:+.0f}"]
    rows = [["base", "–", 1, *cells(gap["base"])]]
    rows += [[v, tau, g["points"], *cells(g)] for v, by_tau in sorted(gap["variants"].items()) for tau, g in by_tau.items()]
    return _table(["model", "tau", "points", "toy-FID 4 steps", "toy-FID 32 steps", "4 minus 32"], rows)


def chains_table(chains: dict) -> list[str]:
    stages = [[v, c["seeds"], s["concept"], *(_pct(s["fidelity"].get(k)) for k in ("star", "heart", "crescent")),
               _pct(s["retention"]), _pct(s["leak"])] for v, c in chains.items() for s in c["stages"]]
    kept = [[v, k, _pct(m["single_run"]), _pct(m["after_chain"]), _pct(m["kept_share"]),
             _interval(c["minus_sft"][k]) if k in c.get("minus_sft", {}) else "–"]
            for v, c in chains.items() for k, m in c["kept"].items()]
    return (_table(["variant", "seeds", "after stage", "star", "heart", "crescent", "retention",
                    "newest concept's leak"], stages)
            + [""] + _table(["variant", "concept", "own run", "after the chain", "kept share",
                             "minus SFT + prior after the chain (points, 95 % interval)"], kept)
            + teacher_difference_lines(chains))


def teacher_difference_lines(chains: dict) -> list[str]:
    """The base teacher's chains minus the EMA teacher's, per concept at the end of the chain."""
    d = chains.get("dopsd + prior, base teacher", {}).get("minus_ema_teacher")
    if not d:
        return []
    return ["", "Base teacher minus EMA teacher after the chain (fidelity points, 95 % interval): "
            + ", ".join(f"{k} {_interval(v)}" for k, v in d.items()) + "."]


def teacher_table(teachers: dict) -> list[str]:
    return _table(["new concept", "chains", "base teacher", "warm-start teacher", "warm start trained without the prior"],
                  [[concept, t["chains"], _pct(t["base"]), _pct(t["warm_start"]), _pct(t.get("warm_start_without_prior"))]
                   for concept, t in teachers.items()])


def lambda_table(runs: dict, names: list[str]) -> list[str]:
    """The lambda runs next to main's run of the same concept, variant, seed, rank and lr (lambda 1)."""
    rows = [runs[n] for n in names]
    for r in list(rows):
        twin = _twin(runs.values(), r, rank=r["run"]["rank"], lr=r["run"]["lr"], prior_weight=PRIOR["prior_weight"])
        if twin and twin not in rows:
            rows.append(twin)
    rows.sort(key=lambda r: (r["run"]["concept"], r["variant"], r["run"].get("prior_weight", PRIOR["prior_weight"])))
    return _table(["concept", "variant", "lambda", *(f"tau {t}" for t in TAUS), "step 200"], [
        [r["run"]["concept"], r["variant"], f"{r['run'].get('prior_weight', PRIOR['prior_weight']):g}",
         *(_point_cells(matched(r["points"], t)) for t in TAUS),
         f"fid {_pct(r['points'][-1]['concept_fidelity'])}, ret {_pct(r['points'][-1]['retention'])}"]
        for r in rows])


def _with_budget(lines: list[str], s: dict) -> str:
    """The budget stage's section (it needs no other stage), after whatever the other stages have."""
    if s.get("budget"):
        b = s["budget"]
        lines = lines + [
            f"## A larger budget: lr {BUDGET['lr']:g}, {BUDGET['steps']} steps ({len(b['runs'])} of {b['planned']} "
            "runs cached)", "",
            "Both methods with the prior, 3 concepts x 3 seeds, evaluated at main's checkpoints and every 100 steps "
            "after. Matched points (seeds that reached tau / seeds) and D-OPSD minus SFT in fidelity points with "
            "95 % bootstrap intervals.", "", *_budget_lines(b), ""]
    if s.get("adapters"):
        a = s["adapters"]
        lines = lines + [
            f"## LoKr and LoHa against LoRA ({len(a['runs'])} of {a['planned']} runs cached)", "",
            f"D-OPSD + prior at the toy's defaults of the time (lr {ORIGIN['lr']:g}, step {a['step']}), 3 concepts x 3 seeds, at "
            "about LoRA rank 16's trainable parameters (LoHa rank 8: the same 204,800; LoKr factor 2, rank 32: "
            "204,880). LoRA's arm is the budget stage's D-OPSD + prior runs at that step. Means over the runs, and "
            "each adapter minus LoRA on the same concepts and seeds, in points with 95 % bootstrap intervals (runs, "
            "then prompts).", "",
            *adapter_lines(a), ""]
    if s.get("levers"):
        lines = lines + lever_lines(s["levers"])
    if s.get("defaults_chains"):
        lines = lines + defaults_chain_lines(s["defaults_chains"]) + [""]
    return "\n".join(lines) + "\n"


def defaults_chain_lines(d: dict) -> list[str]:
    lines = [f"## Continual chains at the toy's defaults ({d['setting']}, {d['chain_steps']} steps a stage)", "",
             "Star -> heart -> crescent with the prior, 3 seeds, every stage at the setting the levers' rule picked "
             "(SFT + prior at its lr, rank and steps). The kept share compares the end of the chain with the concept's own "
             "run at that step (same settings, method and seed).", "", *chains_table(d["chains"])]
    if d.get("chain_teachers"):
        lines += ["", "Warm-start teachers of the EMA-teacher chains (4 steps, target in context):", "",
                  *teacher_table(d["chain_teachers"])]
    return lines


def _cell_text(c: dict | None) -> str:
    if c is None:
        return "none"
    concepts = ", ".join(f"{k} {_pct(v)}" for k, v in c["fidelity_by_concept"].items())
    return (f"**{c['variant']}, step {c['step']}**: {c['model_evals']:,.0f} model evaluations; fidelity "
            f"{_pct(c['concept_fidelity'])} ({concepts}), retention {_pct(c['retention'])}, leak {_pct(c['leak'])}, "
            f"cross-token {_pct(c['cross_token'])}")


def lever_lines(lv: dict) -> list[str]:
    """The levers stage: each setting at the defaults' step and its cheapest checkpoint meeting the aims, the
    rule's pick and D-OPSD minus SFT + prior at the pick's compute."""
    ref = lv.get("reference")
    ref_evals = ref["model_evals"] if ref else None
    share = (lambda e: f"{e / ref_evals:.2f}") if ref_evals else (lambda e: "–")  # noqa: E731
    by_variant: dict[str, list[dict]] = {}
    for c in lv["cells"]:
        by_variant.setdefault(c["variant"], []).append(c)
    rows = []
    for v, cs in by_variant.items():
        at_origin = next((c for c in cs if c["step"] == ORIGIN["steps"]), cs[-1])
        ok = [c for c in cs if complete(c) and meets(c)]
        ok_mean = [c for c in cs if complete(c) and meets(c, each_concept=False)]
        first = lambda xs: f"step {xs[0]['step']} ({xs[0]['model_evals']:,.0f}; {share(xs[0]['model_evals'])})" if xs else "none"  # noqa: E731
        # a combination run past the defaults' step: a row at its last step too
        for last in [at_origin] + [c for c in cs[-1:] if c["step"] > at_origin["step"]]:
            rows.append([v, f"{round(cs[0]['evals_per_step'], 1):g}", f"{last['runs']}", last["step"], _pct(last["concept_fidelity"]),
                         " / ".join(_pct(last["fidelity_by_concept"][c]) if c in last["fidelity_by_concept"] else "–"
                                    for c in sorted(HELD_OUT_SHAPES)), _pct(last["retention"]),
                         _pct(last["leak"]), _pct(last["cross_token"]), f"{last['model_evals']:,.0f}", first(ok_mean),
                         first(ok)])
    aims = (f"fidelity >= {_pct(LEVER_AIMS['fidelity'])}, each concept >= {_pct(LEVER_AIMS['each concept'])}, retention "
            f">= {_pct(LEVER_AIMS['retention'])}, leak <= {_pct(LEVER_AIMS['leak'])}")
    pick = lv["pick"]
    sft_note = "" if lv.get("sft_runs") == "long" else " (the budget stage's 400 until those runs are in)"
    lines = [f"## Cost levers ({len(lv['runs'])} of {lv['planned']} runs cached)", "",
             f"D-OPSD + prior from the toy's defaults of the time (lr {ORIGIN['lr']:g}, rank {ORIGIN['rank']}, "
             f"{ORIGIN['steps']} steps), one lever at a time and in combinations (which may run longer: a second row "
             f"at their last step), 3 concepts x 3 seeds, evaluated at main's checkpoints and every 100 steps from "
             f"{ORIGIN['steps']}; `dopsd + prior` is those defaults' own runs (the budget stage) and `sft + "
             f"prior` SFT with the prior at the same lr for up to {lv.get('sft_long_steps', SFT_LONG['steps'])} steps"
             f"{sft_note}. Compute is model evaluations (a forward or a backward of one sample) spent up to "
             "the checkpoint; a checkpoint is the run of that many steps (constant lr). Share: of today's "
             f"defaults ({'' if ref_evals is None else f'{ref_evals:,.0f} evaluations, '}step {ORIGIN['steps']}). "
             f"Aims: {aims}. Fronts: levers.png.", "",
             *_table(["setting", "evals / step", "runs", "step", "fidelity", " / ".join(sorted(HELD_OUT_SHAPES)), "retention",
                      "leak", "cross-token", "evaluations", "cheapest meeting the mean aims", "cheapest meeting every aim"],
                     rows), "",
             "The rule (the fewest evaluations meeting every aim, mean of 3 concepts x 3 seeds):", "",
             f"- meeting every aim: {_cell_text(pick['every_aim'])}",
             f"- meeting the mean aims (not each concept): {_cell_text(pick['mean_aims'])}",
             f"- the best worst-concept fidelity that keeps retention and leak: {_cell_text(pick['best_worst_concept'])}"]
    ec = lv.get("equal_compute")
    if ec:
        lines += ["", *equal_compute_lines(ec, ec["variant"], "the pick's")]
    if lv.get("defaults_cost"):
        lines += ["", *defaults_cost_lines(lv["defaults_cost"])]
    return lines + [""]


def defaults_cost_lines(rows: list[dict]) -> list[str]:
    """What a run costs at the old and the new defaults (levers.defaults_cost); docs/benchmarks.md quotes it."""
    n = rows[0]["at_steps"]
    return ["What a toy run costs, old and new defaults (K = 4, batch 4, 4 prior roll-outs a step; SFT + prior "
            "adds its class images once); share of the old defaults' D-OPSD + prior run:", "",
            *_table(["setting", "evaluations / step", "steps", "evaluations a run", f"evaluations, {n:,} steps",
                     "share"],
                    [[r["setting"], f"{r['evals_per_step']:g}", r["steps"], f"{r['run_evals']:,.0f}",
                      f"{r['evals_at']:,.0f}", f"{r['share']:.2f}"] for r in rows])]


def equal_compute_lines(ec: dict, variant: str, whose: str) -> list[str]:
    rows = [[k, _pct(d["dopsd_fidelity"]), _pct(d["sft_fidelity"]), _interval(d),
             f"{d['sft_run_evals']:,.0f}" + (" (ends before)" if d["sft_run_evals"] < ec["model_evals"] else "")]
            for k, d in ec["by_concept"].items()]
    return [f"D-OPSD minus SFT + prior at equal compute: {variant} and SFT + prior each limited to "
            f"{ec['model_evals']:,.0f} evaluations ({whose}), matched points at selection retention >= "
            f"{ec['tau']} (fidelity 0 where not reached), same concepts and seeds; points with 95 % bootstrap "
            "intervals.", "",
            *_table(["concept", "D-OPSD", "SFT + prior", "D-OPSD − SFT", "SFT run's evaluations"], rows)]


def study_markdown(results: dict) -> str:
    runs = results["runs"]
    s = results["summary"]
    lines = ["# Toy trade-off study", "",
             "Generated by `python -m experiments.toy.lab experiment --stage ...` from results.json; every number "
             "below is from it.", ""]
    main = s.get("main")
    if main and main.get("default"):
        d = main["default"]
        lines += ["## Main's pick and the aims", "",
                  f"Best mean fidelity over every concept and seed whose mean selection retention is >= "
                  f"{DEFAULT_TAU}: **{d['variant']}, lr {d['lr']:g}, step {d['step']}** ({d['runs']} runs); the "
                  "toy's defaults until the budget stage (last section) moved them. At 4 steps, on the evaluation "
                  "prompts:", "", *aims_table(d), ""]
    prune = [runs[name] for name in s["prune"]["runs"]]
    point_keys = ("concept_fidelity", "retention", "retention_selection", "leak", "cross_token")
    lines += ["## Prune (star, seed 0, rank 16): every checkpoint at 4 steps", "",
              *_table(["variant", "lr", "step", "fidelity", "retention", "selection retention", "leak", "cross_token",
                       "model evals"],
                      [[r["variant"], f"{r['run']['lr']:g}", p["step"], *(_pct(p[k]) for k in point_keys),
                        p["model_evals"]] for r in prune for p in r["points"]]),
              "", "## Matched points (best fidelity with selection retention >= tau; retention shown on the "
              "evaluation prompts)", "",
              *_table(["variant", "lr", *(f"tau {t}" for t in TAUS)],
                      [[r["variant"], f"{r['run']['lr']:g}", *(_point_cells(matched(r["points"], t)) for t in TAUS)]
                       for r in prune])]
    if "kept_lr" not in s["prune"]:
        return _with_budget(lines, s)
    lines += ["", "Kept lr per variant (largest sum of matched fidelities over the taus):", ""]
    for v, c in s["prune"]["kept_lr"].items():
        at = ", ".join(f"tau {t}: {_pct(f)}" for t, f in c["fidelity_at"].items())
        lines.append(f"- {v}: " + ("no lr reached any tau with fidelity > 0" if c["lr"] is None else
                                   f"lr {c['lr']:g} ({at})"))
    if not main:
        return _with_budget(lines, s)
    lines += ["", f"## Main: kept lrs, rank 16 ({len(main['runs'])} of {main['planned']} planned runs cached)", "",
              "Means over the seeds of the matched point per seed (fidelity counts 0 where tau is not reached; "
              "retention, leak and cross_token are means over the seeds that reached it). Fronts: fronts.png "
              "(every checkpoint, means over seeds).", ""]
    for concept, by_tau in main["by_concept"].items():
        rows = [[tau, v, f"{m['seeds']} ({m['reached']})", _pct(m["concept_fidelity"]),
                 *(_pct(m[k]) if m["reached"] else "–" for k in ("retention", "leak", "cross_token"))]
                for tau, row in by_tau.items() for v, m in row.items() if " - " not in v]
        lines += [f"### {concept}", "",
                  *_table(["tau", "variant", "seeds (reached)", "fidelity", "retention", "leak", "cross_token"], rows), ""]
    lines += ["### D-OPSD minus SFT", "",
              "Fidelity difference in points at the matched points, 95 % bootstrap interval over seeds, then "
              "prompts. Equal compute: D-OPSD's checkpoints within the model evaluations of the whole SFT run "
              "of the same seed.", "", *differences_table(main["by_concept"]), ""]
    if main.get("best_found"):
        lines += ["### The best single checkpoints found", "",
                  "Over every main run and checkpoint (any concept, variant and seed): the highest fidelity at each "
                  "retention level.", "", *best_table(main["best_found"]), ""]
    main_runs = [runs[n] for n in main["runs"] if n in runs]
    small = [r for r in main_runs if r["run"]["rank"] == SMALL_RANK]
    if small:
        large = [r for r in main_runs if r["run"]["rank"] != SMALL_RANK]
        pairs = [x for r in small for x in (_twin(large, r), r) if x]
        lines += [f"### Rank {SMALL_RANK} against rank 16 (star, seed 0)", "",
                  *_table(["variant", "rank", *(f"tau {t}" for t in TAUS)],
                          [[x["variant"], x["run"]["rank"], *(_point_cells(matched(x["points"], t)) for t in TAUS)]
                           for x in pairs]), ""]
    if s.get("gap"):
        lines += ["## Few-step gap at the matched points", "",
                  "toy-FID (lower is better) of the 192 unrelated prompts at 4 and 32 steps, means over the "
                  "matched points of every concept and seed.", "", *gap_table(s["gap"]), ""]
    if s.get("chains"):
        lines += ["## Continual chains: star -> heart -> crescent, with the prior", "",
                  "Fidelity of each concept after each stage, means over seeds; the kept share compares the end "
                  f"of the chain with the concept's own main run (step {CHECKPOINTS[-1]}, same method and seed).", "",
                  *chains_table(s["chains"]), ""]
        if s.get("chain_teachers"):
            lines += [TEACHER_NOTE, "",
                      *teacher_table(s["chain_teachers"]), ""]
    if s.get("lambda"):
        lines += ["## The prior's weight (seed 0)", "", *lambda_table(runs, s["lambda"]["runs"]), ""]
    if s.get("one_state"):
        o = s["one_state"]
        lines += [f"## One supervised state per step ({len(o['runs'])} of {o['planned']} runs cached)", "",
                  "D-OPSD + prior with `--states one` (one random roll-out state per sample, its prefix without "
                  "gradients) against main's SFT + prior runs, same seeds. Fidelity points with 95 % bootstrap "
                  "intervals; equal compute: the one-state checkpoints within the SFT run's model evaluations.", "",
                  *one_state_table(o["by_concept"]), ""]
    return _with_budget(lines, s)


def readme_section(results: dict) -> str:
    """The README's results section, generated from results.json (a test keeps the two equal)."""
    s = results["summary"]
    main = s.get("main", {})
    lines = [f"Study: {len(main.get('runs', []))} of {main.get('planned', '?')} main runs (3 concepts x 3 seeds "
             "x 4 variants, and rank 3 on the star), each evaluated at steps " + "/".join(map(str, CHECKPOINTS))
             + " at 4 sampling steps (96 fidelity samples, 192 unrelated prompts)."]
    d = main.get("default")
    if d:
        lines += ["", f"**Main's pick:** {d['variant']}, lr {d['lr']:g}, {d['step']} steps (the best mean fidelity over "
                  f"all concepts and seeds with mean selection retention >= {DEFAULT_TAU}; the toy's defaults until "
                  "the larger budget below moved them). Against the aims, mean over 3 concepts x 3 seeds:", "",
                  *aims_table(d)]
    if main.get("by_concept"):
        lines += ["", "**Fronts.** Fidelity at the matched point (best fidelity with retention >= tau on a separate "
                  "prompt set), mean over seeds (seeds that reached tau / seeds):", "", *fronts_table(main["by_concept"]),
                  "", "**D-OPSD minus SFT**, fidelity points with 95 % bootstrap intervals (seeds, then prompts); "
                  "equal compute gives D-OPSD only the model evaluations of the SFT run:", "",
                  *differences_table(main["by_concept"])]
    if main.get("best_found"):
        lines += ["", "**The best single checkpoints found** (any concept, variant and seed):", "",
                  *best_table(main["best_found"])]
    if s.get("gap"):
        lines += ["", "**Few-step gap** (toy-FID, lower is better; the base is a 4-step model):", "", *gap_table(s["gap"])]
    if s.get("chains"):
        lines += ["", "**Continual chains** (star -> heart -> crescent, prior on, 3 seeds):", "", *chains_table(s["chains"])]
        if s.get("chain_teachers"):
            lines += ["", "Teacher fidelity on a warm-started stage's new concept (target in context), base vs the warm "
                      "start's LoRA:", "", *teacher_table(s["chain_teachers"])]
    if s.get("lambda"):
        lines += ["", "**The prior's weight** (seed 0):", "", *lambda_table(results["runs"], s["lambda"]["runs"])]
    if s.get("budget"):
        lines += ["", f"**A larger budget** (lr {BUDGET['lr']:g}, {BUDGET['steps']} steps, both methods with the prior, "
                  "3 seeds):", "", *_budget_lines(s["budget"])]
    if s.get("one_state"):
        lines += ["", "**One supervised state per step** (D-OPSD + prior, `--states one`, 3 seeds) against SFT + "
                  "prior; equal compute gives it the SFT run's model evaluations:", "",
                  *one_state_table(s["one_state"]["by_concept"])]
    if s.get("adapters"):
        a = s["adapters"]
        lines += ["", f"**LoKr and LoHa against LoRA** ({len(a['runs'])} of {a['planned']} runs; D-OPSD + prior at the "
                  f"defaults, step {a['step']}, about equal trainable parameters; each adapter minus LoRA on the same "
                  "concepts and seeds, points with 95 % intervals):", "", *adapter_lines(a), "",
                  adapter_verdict(a)]
    for part in (lever_lines(s["levers"]) if s.get("levers") else [],
                 defaults_chain_lines(s["defaults_chains"]) if s.get("defaults_chains") else []):
        if part:
            lines += [""] + ["**" + line[3:] + "**" if line.startswith("## ") else line for line in part]
    return "\n".join(lines) + "\n"


def adapter_verdict(a: dict) -> str:
    """What the adapter comparison supports, in one sentence: an adapter is recommended over LoRA only with
    every run in, its fidelity interval above 0, and retention and leak not worse by more than 2 points at
    the interval's end."""
    planned_each = a["planned"] // len(ADAPTER_SETTINGS)
    better, parts = [], []
    for name in ADAPTER_SETTINGS:
        e = a["arms"].get(name)
        if not e or e["runs"] < planned_each or "minus_lora" not in e:
            return (f"Not every run is in ({len(a['runs'])} of {a['planned']}): no adapter is recommended yet; LoRA "
                    "stays the default.")
        d = e["minus_lora"]
        parts.append(f"{name} fidelity {_interval(d['concept_fidelity'])}, retention {_interval(d['retention'])}")
        if d["concept_fidelity"]["lo"] > 0 and d["retention"]["lo"] > -0.02 and d["leak"]["hi"] < 0.02:
            better.append(name)
    verdict = (f"{' and '.join(better)} beat{'s' if len(better) == 1 else ''} LoRA on fidelity without losing "
               "retention or leak beyond 2 points" if better else
               "Neither adapter beats LoRA on the toy (a fidelity interval above 0 without losing retention or leak)")
    advice = (f"Recommended on the toy; LoRA stays the default until klein and Z-Image show the same" if better else
              "LoRA stays the default and the recommendation; LoKr and LoHa are there for users who want their files")
    return f"{verdict} ({'; '.join(parts)}). {advice}."


VARIANT_COLOURS = {"dopsd": (40, 90, 190), "dopsd + prior": (20, 160, 200), "sft": (220, 120, 60),
                   "sft + prior": (190, 40, 60)}


def fronts_figure(main: list[dict], panel: int = 280) -> Image.Image:
    """Fidelity (y) against retention (x) per concept: each variant's checkpoints in step order (the
    first one ringed), means over seeds (rank 16); the grey line is retention 0.8."""
    concepts = sorted({r["run"]["concept"] for r in main})
    img = Image.new("RGB", (panel * len(concepts), panel + 40), "white")
    d = ImageDraw.Draw(img)
    for i, concept in enumerate(concepts):
        x0, y0, size = i * panel + 40, 20, panel - 60
        d.rectangle([x0, y0, x0 + size, y0 + size], outline=(150, 150, 150))
        d.line([(x0 + 0.8 * size, y0), (x0 + 0.8 * size, y0 + size)], fill=(210, 210, 210))
        d.text((x0, 4), f"{concept}: fidelity (y) vs retention (x)", fill=(0, 0, 0))
        d.text((x0 - 10, y0 - 4), "1", fill=(0, 0, 0))
        d.text((x0 - 10, y0 + size - 8), "0", fill=(0, 0, 0))
        d.text((x0 + size - 4, y0 + size + 3), "1", fill=(0, 0, 0))
        d.text((x0 + size // 2 - 24, y0 + size + 3), "retention", fill=(0, 0, 0))
        for v, colour in VARIANT_COLOURS.items():
            rs = [r for r in main if r["run"]["concept"] == concept and r["variant"] == v and r["run"]["rank"] != SMALL_RANK]
            if not rs:
                continue
            pts = []
            for j in range(min(len(r["points"]) for r in rs)):
                ret = sum(r["points"][j]["retention"] for r in rs) / len(rs)
                fid = sum(r["points"][j]["concept_fidelity"] for r in rs) / len(rs)
                pts.append((x0 + ret * size, y0 + (1 - fid) * size))
            d.line(pts, fill=colour, width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            d.ellipse([pts[0][0] - 5, pts[0][1] - 5, pts[0][0] + 5, pts[0][1] + 5], outline=colour)
    x = 40
    for v, colour in VARIANT_COLOURS.items():
        d.text((x, panel + 22), v, fill=colour)
        x += 20 + 7 * len(v)
    d.text((x, panel + 22), "(ringed: step 10)", fill=(0, 0, 0))
    return img

"""Writes the measured results of README.md and docs/toy_results.md from the committed results files, so
that no number in them is typed by hand: the demo's paragraph from docs/demo_metrics.json and the
results summary from experiments/toy/study/results.json (README), the first experiment's tables from
experiments/toy/results.json and the trade-off study's tables from experiments/toy/study/results.json
(docs/toy_results.md). Each lives between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.

    python tools/readme_results.py          # rewrite the files
    python tools/readme_results.py --check  # exit 1 if a file differs (tests/toy/test_readme_results.py)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "docs" / "demo_metrics.json"
STUDY = ROOT / "experiments" / "toy" / "study" / "results.json"
EXPERIMENT = ROOT / "experiments" / "toy" / "results.json"
EXPERIMENT_STAMP = ROOT / "experiments" / "toy" / "base" / "stamp.json"


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def demo_block(m: dict, study: dict | None = None) -> str:
    from dopsd_core.family_spec import TOY
    b, lo = m["base"], m["lora"]
    steps = m.get("steps", TOY.steps)
    text = (f"On the shipped toy base the demo LoRA ({m['concept']}, token `{m['token']}`, {steps} steps, trained "
            f"in {m['train_seconds']:.0f} s) takes concept fidelity from {_pct(b['concept_fidelity'])} to "
            f"{_pct(lo['concept_fidelity'])} of 4-step samples. Retention on 192 unrelated prompts goes from "
            f"{_pct(b['retention'])} to {_pct(lo['retention'])}, {_pct(lo['leak'])} of them come out as the "
            f"{m['concept']} (leak), and {_pct(lo['cross_token'])} of the other concept tokens' prompts do "
            f"(cross_token). 4-step toy-FID goes from {b['quality_4']:.0f} to {lo['quality_4']:.0f}; 32-step "
            f"from {b['quality_32']:.0f} to {lo['quality_32']:.0f} (lower is better; "
            "[docs/demo_metrics.json](docs/demo_metrics.json)).\n")
    return text + (_longer_budget(steps, study) if study and steps != TOY.steps else "")


def _longer_budget(steps: int, study: dict) -> str:
    """The demo stops short of the defaults' steps (5 minutes on 2 cores): what the rest adds, from the
    study's cells of the defaults' setting at the two step counts (3 concepts x 3 seeds)."""
    from dopsd_core.family_spec import TOY
    shipped = study["summary"]["budget"]["shipped"]
    cells = {c["step"]: c for c in study["summary"]["levers"]["cells"] if c["variant"] == shipped["variant"]}
    short, full = cells[steps], cells[TOY.steps]

    def pair(key: str) -> str:
        return f"{_pct(short[key])} → {_pct(full[key])}"
    concepts = ", ".join(f"{c} {_pct(v)} → {_pct(full['fidelity_by_concept'][c])}"
                         for c, v in short["fidelity_by_concept"].items())
    return (f"\nThe demo trains {steps} of the defaults' {TOY.steps} steps to stay under 5 minutes on 2 cores. In "
            f"the study (3 concepts × 3 seeds) the other {TOY.steps - steps} steps take fidelity {pair('concept_fidelity')} "
            f"({concepts}), retention {pair('retention')}, leak {pair('leak')}, for {full['model_evals'] / short['model_evals']:.1f}× "
            "the model evaluations.\n")


def experiment_block(results: dict) -> str:
    """The first experiment's tables (main, ablations) and its continual line, as in its results.md."""
    from experiments.toy.lab.experiment import ablation_table, continual_line, main_table
    continual = continual_line(results)
    return ("\n".join(main_table(results)) + "\n\nAblations on the star (default = D-OPSD, EMA teacher, x0 weight, "
            "all K = 4 states):\n\n" + "\n".join(ablation_table(results)) + "\n"
            + (f"\nContinual chain: {continual}\n" if continual else ""))


def base_notice(measured_on: str, shipped: str) -> str:
    """A line that says so when a results file describes another toy base than the shipped one."""
    if measured_on == shipped:
        return ""
    return (f"> Measured on an earlier toy base (`{measured_on}`), not the shipped one (`{shipped}`): these "
            "numbers describe that base until they are measured again on the shipped one.\n\n")


def results_block(study: dict) -> str:
    """The README's summary: the toy's defaults against the aims, and the continual chain at them."""
    from dopsd_core.family_spec import TOY, number_text
    from experiments.toy.lab.study import BUDGET
    from experiments.toy.lab.study_report import AIMS
    budget = study["summary"]["budget"]
    shipped = budget["shipped"]
    # the chains at the defaults: the ones run at the levers' pick once every variant's seeds are in, else the
    # budget's (the defaults before the levers stage)
    from experiments.toy.lab.chains import SEEDS, VARIANTS
    at_pick = study["summary"].get("defaults_chains")
    if at_pick and not all(at_pick["chains"].get(v, {}).get("seeds") == len(SEEDS) for v in VARIANTS):
        at_pick = None
    chains, chain_steps = (at_pick["chains"], at_pick["chain_steps"]) if at_pick else (budget["chains"], budget["chain_steps"])
    aims = ", ".join(f"{k.replace('concept_', '')} {_pct(shipped[k])} (aim {op} {_pct(v)})"
                     for k, (op, v) in AIMS.items())
    levers = "".join([f", {TOY.states} state{'s' if TOY.states != 'one' else ''} supervised" if TOY.states != "all" else "",
                      f", prior every {TOY.prior_every} steps" if TOY.prior_every != 1 else "",
                      f", prior on {TOY.prior_states} state{'s' if TOY.prior_states != 'one' else ''}"
                      if TOY.prior_states != "same" else ""])
    lines = [f"At the toy's defaults (lr {number_text(TOY.lr)}, {TOY.steps} steps, rank {TOY.rank}, batch "
             f"{TOY.batch_size}, prior on{levers}), D-OPSD + prior, mean of {shipped['runs']} runs (3 concepts × 3 "
             f"seeds): {aims}.", ""]

    def end(variant: str) -> str:
        last = chains[variant]["stages"][-1]
        kept = ", ".join(f"{c} {_pct(v)}" for c, v in last["fidelity"].items())
        return f"{kept} at {_pct(last['retention'])} retention"
    order = " → ".join(st["concept"] for st in chains["dopsd + prior"]["stages"])
    # the budget stage's chains ran at the defaults before the levers stage's pick (lr 3e-3, rank 16)
    earlier = "" if at_pick else f"At the earlier defaults (lr {number_text(BUDGET['lr'])}, rank 16), t"
    lines += [f"{earlier or 'T'}aught one after another ({order}, {chain_steps} steps each), the concepts' fidelity at "
              f"the end of the chain: D-OPSD + prior {end('dopsd + prior')}; SFT + prior, same steps, "
              f"{end('sft + prior')}.", "",
              f"D-OPSD + prior minus SFT + prior in concept fidelity, at retention {TAU} (points, 95 % interval): "
              f"at equal steps (lr {number_text(BUDGET['lr'])}, rank 16, {BUDGET['steps']}-step runs) "
              f"{_differences(budget, '')}; {_equal_compute(budget)} ([docs/toy_results.md](docs/toy_results.md))."
              f"{_sft_every_aim(study, shipped)}"]
    adapters = study["summary"].get("adapters")
    if adapters:
        from experiments.toy.lab.study_report import adapter_verdict
        lines += ["", f"LoKr and LoHa against LoRA (D-OPSD + prior at the defaults, about equal trainable parameters, "
                  f"3 concepts × 3 seeds): {adapter_verdict(adapters)}"]
    return "\n".join(lines) + "\n"


TAU = "0.8"  # the retention at which the study matches the two methods' checkpoints


def _points(x: float) -> str:
    return f"{round(100 * x) + 0:+d}".replace("-", "−")  # + 0: no "-0"


def _interval(d: dict) -> str:
    return f"{_points(d['diff'])} [{_points(d['lo'])}, {_points(d['hi'])}]"


def _differences(budget: dict, kind: str) -> str:
    cells = []
    for concept, by_tau in budget["by_concept"].items():
        d = by_tau.get(TAU, {}).get(f"dopsd + prior - sft + prior{kind}")
        cells.append(f"{concept} –" if d is None else f"{concept} {_interval(d)}")
    return ", ".join(cells)


def _equal_compute(budget: dict) -> str:
    """At equal compute: at the defaults' own model evaluations against the long SFT + prior runs once those
    are measured, else the budget stage's 400 steps each, capped at the SFT run's evaluations."""
    ec = budget.get("shipped_equal_compute")
    if not ec:
        return f"at equal compute (a D-OPSD step costs several SFT steps) {_differences(budget, ', equal compute')}"
    diffs = ", ".join(f"{c} {_interval(ec['by_concept'][c])}" for c in budget["by_concept"] if c in ec["by_concept"])
    sft_end = min(d["sft_run_evals"] for d in ec["by_concept"].values())  # the shortest SFT run
    sft = ("SFT + prior trains as many steps as fit in them" if sft_end >= ec["model_evals"] else
           f"SFT + prior's runs end at {sft_end:,.0f}, so it has less")
    return f"at equal compute (the defaults' {ec['model_evals']:,.0f} model evaluations; {sft}) {diffs}"


def _sft_every_aim(study: dict, shipped: dict) -> str:
    """Where SFT + prior's long runs meet every aim of the levers stage, and what that costs against the
    defaults (empty until those runs are in)."""
    from dopsd_core.family_spec import number_text
    from experiments.toy.lab.study import SFT_LONG
    lv = study["summary"].get("levers")
    if not lv or lv.get("sft_runs") != "long":
        return ""
    c = lv["sft_every_aim"]
    if c is None:
        return f" SFT + prior meets every aim at no step up to {lv['sft_long_steps']:,}."
    return (f" Given the steps, SFT + prior (lr {number_text(SFT_LONG['lr'])}, rank 16) meets every aim too: at step "
            f"{c['step']:,} ({c['model_evals']:,.0f} model evaluations, {c['model_evals'] / shipped['model_evals']:.2f}× "
            f"the defaults'; fidelity {_pct(c['concept_fidelity'])}, star {_pct(c['fidelity_by_concept']['star'])}).")


def _from_docs(text: str) -> str:
    """Links written for the repository root, rewritten for a page in docs/."""
    return text.replace("](docs/", "](").replace("](experiments/", "](../experiments/")


def blocks() -> dict[str, str]:
    """Every generated block, by name (each file takes the blocks it has markers for)."""
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from experiments.toy.lab.study_report import readme_section
    study = json.loads(STUDY.read_text())
    shipped = load_toy_file(BASE_WEIGHTS).fingerprint()
    experiment = json.loads(EXPERIMENT.read_text())
    return {"demo": demo_block(json.loads(DEMO.read_text()), study),
            "results": results_block(study),
            "experiment": _from_docs(base_notice(json.loads(EXPERIMENT_STAMP.read_text())["base"], shipped)
                                     + experiment_block(experiment)),
            "study": _from_docs(base_notice(study["stamp"]["base"], shipped) + readme_section(study))}


FILES = {ROOT / "README.md": ("demo", "results"), ROOT / "docs" / "toy_results.md": ("experiment", "study")}


def render(readme: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        readme = pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)
    return readme


def main(argv: list[str]) -> int:
    generated, stale = blocks(), []
    for path, names in FILES.items():
        current = path.read_text(encoding="utf-8")
        wanted = render(current, {n: generated[n] for n in names})
        if wanted != current:
            stale.append(path)
            if "--check" not in argv:
                tmp = path.with_suffix(".md.tmp")
                tmp.write_text(wanted, encoding="utf-8")
                tmp.replace(path)
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

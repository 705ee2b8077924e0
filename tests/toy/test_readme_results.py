"""tools/readme_results.py: the README's measured results equal what the committed results files say."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("dopsd_readme_results", ROOT / "tools" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_are_the_generated_ones():
    tool = _tool()
    generated = tool.blocks()
    assert set(tool.FILES) == {ROOT / "README.md", ROOT / "docs" / "toy_results.md"}
    for path, names in tool.FILES.items():
        text = path.read_text(encoding="utf-8")
        assert tool.render(text, {n: generated[n] for n in names}) == text, \
            f"{path.name}: results are stale: run python tools/readme_results.py"


def test_the_readme_summary_quotes_the_study():
    tool = _tool()
    budget = json.loads(tool.STUDY.read_text())["summary"]["budget"]
    block = tool.blocks()["results"]
    assert f"fidelity {100 * budget['shipped']['concept_fidelity']:.0f} %" in block
    at_steps = budget["by_concept"]["star"][tool.TAU]["dopsd + prior - sft + prior"]
    assert f"star {tool._points(at_steps['diff'])} [" in block.split("at equal compute")[0]
    # equal compute: at the defaults' own evaluations against the long SFT runs once measured, else the budget's
    ec = budget.get("shipped_equal_compute")
    star = ec["by_concept"]["star"] if ec else budget["by_concept"]["star"][tool.TAU][
        "dopsd + prior - sft + prior, equal compute"]
    assert f"star {tool._points(star['diff'])} [{tool._points(star['lo'])}, " in block.split("at equal compute")[1]
    if ec:
        assert f"the defaults' {ec['model_evals']:,.0f} model evaluations" in block


def test_the_blocks_come_from_the_files_and_a_missing_block_is_named():
    tool = _tool()
    demo = json.loads(tool.DEMO.read_text())
    block = tool.blocks()["demo"]
    assert f"to {100 * demo['lora']['concept_fidelity']:.0f} %" in block
    study = json.loads(tool.STUDY.read_text())
    main = study["summary"]["main"]
    if main["default"]:  # a finished main stage: its default choice is quoted
        assert f"{100 * main['default']['concept_fidelity']:.0f}%" in tool.blocks()["study"]
    else:  # a study under way says how far it got
        assert f"Study: {len(main['runs'])} of {main['planned']} main runs" in tool.blocks()["study"]
    text = "a\n<!-- demo:begin -->\nold\n<!-- demo:end -->\nb\n"
    assert tool.render(text, {"demo": "new\n"}) == "a\n<!-- demo:begin -->\nnew\n<!-- demo:end -->\nb\n"
    with pytest.raises(SystemExit, match="study:begin"):
        tool.render(text, {"study": "x\n"})


def test_a_study_of_another_base_says_so():
    tool = _tool()
    assert tool.base_notice("toy-a", "toy-a") == ""
    notice = tool.base_notice("toy-a", "toy-b")
    assert "`toy-a`" in notice and "`toy-b`" in notice and "earlier toy base" in notice


def test_a_demo_short_of_the_defaults_steps_says_what_the_rest_adds():
    from dopsd_core.family_spec import TOY
    tool = _tool()
    demo = json.loads(tool.DEMO.read_text())
    short = TOY.steps // 2

    def cell(step, fid, star, ret, evals):
        return {"variant": "v", "step": step, "concept_fidelity": fid, "retention": ret, "leak": 0.02,
                "model_evals": evals, "fidelity_by_concept": {"heart": 0.99, "star": star}}
    study = {"summary": {"budget": {"shipped": {"variant": "v"}},
                         "levers": {"cells": [cell(short, 0.7, 0.4, 0.9, 100), cell(TOY.steps, 0.9, 0.8, 0.88, 200),
                                              {**cell(TOY.steps, 0.1, 0.1, 0.1, 1), "variant": "other"}]}}}
    text = tool.demo_block({**demo, "steps": short}, study)
    assert f"{short} steps, trained in" in text
    assert (f"The demo trains {short} of the defaults' {TOY.steps} steps to stay under 5 minutes on 2 cores" in text
            and "fidelity 70 % → 90 % (heart 99 % → 99 %, star 40 % → 80 %), retention 90 % → 88 %" in text
            and "for 2.0× the model evaluations" in text)
    assert "The demo trains" not in tool.demo_block({**demo, "steps": TOY.steps}, study)  # the whole budget


def test_the_chain_sentence_moves_to_the_defaults_chains_once_all_are_in():
    """Until every variant's 3 chains at the picked defaults are in, the README quotes the earlier defaults'."""
    import copy
    tool = _tool()
    study = json.loads(tool.STUDY.read_text())
    budget = study["summary"]["budget"]
    done = {"setting": "x", "chain_steps": 123, "chains": copy.deepcopy(budget["chains"])}
    for v in done["chains"].values():
        v["stages"][-1]["fidelity"] = {k: 0.555 for k in v["stages"][-1]["fidelity"]}
    partial = copy.deepcopy(done)
    partial["chains"].pop("sft + prior")
    study["summary"]["defaults_chains"] = partial
    block = tool.results_block(study)
    assert "At the earlier defaults" in block and "123 steps each" not in block
    study["summary"]["defaults_chains"] = done
    block = tool.results_block(study)
    assert "At the earlier defaults" not in block and "123 steps each" in block and "56 %" in block


def test_the_readme_says_where_sft_with_the_prior_meets_every_aim_once_its_long_runs_are_in():
    """The cheapest SFT + prior cell meeting every aim, against the defaults' evaluations; nothing while the
    long runs are missing."""
    import copy
    from experiments.toy.lab import levers
    tool = _tool()
    study = json.loads(tool.STUDY.read_text())
    lv = study["summary"]["levers"]
    assert lv["sft_runs"] == "long"
    ok = [c for c in lv["cells"] if c["variant"] == levers.SFT and levers.complete(c) and levers.meets(c)]
    block = tool.results_block(study)
    if ok:
        c = min(ok, key=lambda c: c["model_evals"])
        ratio = c["model_evals"] / study["summary"]["budget"]["shipped"]["model_evals"]
        assert f"meets every aim too: at step {c['step']:,} ({c['model_evals']:,.0f} model evaluations, {ratio:.2f}×" in block
    short = copy.deepcopy(study)
    short["summary"]["levers"]["sft_runs"] = "budget"
    assert "SFT + prior (lr" not in tool.results_block(short) and "meets every aim" not in tool.results_block(short)
    none = copy.deepcopy(study)
    none["summary"]["levers"]["sft_every_aim"] = levers.cheapest([])
    assert "SFT + prior meets every aim at no step up to 3,000" in tool.results_block(none)

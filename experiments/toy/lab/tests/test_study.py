"""The trade-off study (study.py, chains.py, study_report.py, stages.py): prompt sets, compute counts, matched
points, lr choice, tiny resumable stages and chains, and the report."""
import json

import pytest

from dopsd_core.errors import DopsdError
from experiments.toy.lab import chains as chains_mod, stages, study, study_report
from dopsd_core.toy.metrics import unrelated_prompts
from dopsd_core.toy.render import prior_prompts
from testutil import needs_weights

# The tests' evaluation sets: small, since they test the plumbing (a fidelity prompt still has 4 seeds)
TINY_METRICS = dict(n_unrelated=12, n_selection=12, n_fidelity=6, n_cross=6)


def test_selection_prompts_are_separate_from_the_evaluation_and_prior_sets():
    sel = {p for p, *_ in study.selection_prompts()}
    assert len(sel) > 40 and not sel & {p for p, *_ in unrelated_prompts()} and not sel & set(prior_prompts())


def test_model_evaluations_per_step():
    assert study.evals_per_step("dopsd", False, k=4, batch=4) == 3 * 4 * 4
    assert study.evals_per_step("dopsd", True, k=4, batch=4) == 3 * 4 * (4 + study.PRIOR["prior_batch"])
    assert study.evals_per_step("sft", False, k=4, batch=4) == 2 * 4
    assert study.evals_per_step("dopsd", False, k=4, batch=4, states="one") == (1.5 + 3) * 4  # mean prefix 1.5
    assert study.setup_evals("sft", True, 10, k=4) == 32 * 4 and study.setup_evals("dopsd", True, 10) == 0


def test_the_defaults_cost_table_counts_runs_at_the_old_and_new_defaults_and_docs_quote_it():
    """Per run: steps x evaluations a step (+ SFT's class images once); the new defaults are the family spec's.
    docs/benchmarks.md's table is the committed report's (re-run the report and copy it when they differ)."""
    from pathlib import Path
    from dopsd_core.family_spec import TOY
    from experiments.toy.lab import levers
    rows = {r["setting"].split(" (")[0]: r for r in levers.defaults_cost(prior_prompts=100)}
    assert rows["D-OPSD + prior, old defaults"]["run_evals"] == study.ORIGIN["steps"] * 96
    assert rows["D-OPSD + prior, new defaults"]["run_evals"] == TOY.steps * 96
    assert rows["SFT + prior, new defaults"]["run_evals"] == TOY.steps * 16 + 100 * 4
    assert rows["D-OPSD + prior, new defaults"]["share"] == pytest.approx(TOY.steps / study.ORIGIN["steps"])
    root = Path(__file__).resolve().parents[4]
    committed = json.loads((root / "experiments/toy/study/results.json").read_text())["summary"]["levers"]["defaults_cost"]
    prompts = (committed[1]["run_evals"] - committed[1]["steps"] * 16) // 4
    assert committed == levers.defaults_cost(prior_prompts=prompts), "re-run the study's report (--stage report)"
    table = "\n".join(study_report.defaults_cost_lines(committed)[2:])
    assert table in (root / "docs/benchmarks.md").read_text(), "copy the report's table into docs/benchmarks.md"


def _p(step, fid, sel):
    return {"step": step, "concept_fidelity": fid, "retention_selection": sel}


def test_matched_point_and_lr_choice():
    points = [_p(10, 0.2, 0.9), _p(20, 0.5, 0.82), _p(40, 0.9, 0.6)]
    assert study.matched(points, 0.8)["step"] == 20 and study.matched(points, 0.6)["step"] == 40
    assert study.matched(points, 0.95) is None
    runs = [{"variant": "dopsd", "run": {"lr": 1e-3}, "points": points},
            {"variant": "dopsd", "run": {"lr": 1e-4}, "points": [_p(10, 0.1, 0.9), _p(20, 0.6, 0.85)]},
            {"variant": "sft", "run": {"lr": 1e-3}, "points": [_p(10, 0.3, 0.5)]}]
    chosen = study.choose_lr(runs)  # 1e-3: 0.5 + 0.5 + 0.9 = 1.9 against 1e-4: 0.6 + 0.6 + 0.6 = 1.8
    assert chosen["dopsd"]["lr"] == 1e-3 and chosen["dopsd"]["fidelity_at"] == {0.8: 0.5, 0.7: 0.5, 0.6: 0.9}
    assert chosen["sft"]["lr"] is None  # never reached 0.6
    tie = [{"variant": "v", "run": {"lr": lr}, "points": [_p(10, 0.4, 0.9)]} for lr in (1e-3, 1e-4)]
    assert study.choose_lr(tie)["v"]["lr"] == 1e-4


@needs_weights
def test_a_tiny_prune_stage_runs_caches_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "CHECKPOINTS", (2, 4))
    monkeypatch.setattr(study, "LRS", (1e-3,))
    monkeypatch.setattr(study, "VARIANTS", (("dopsd", False), ("sft", True)))
    monkeypatch.setattr(stages, "METRIC_SIZES", TINY_METRICS)
    res = stages.run_study(tmp_path, "prune", log=lambda *_: None)
    runs = res["runs"]
    assert len(runs) == 2 and all([p["step"] for p in r["points"]] == [2, 4] for r in runs.values())
    sft = next(r for r in runs.values() if r["variant"] == "sft + prior")
    assert sft["prior_prompts"] > 80 and sft["points"][1]["model_evals"] == sft["setup_evals"] + 4 * 16
    for r in runs.values():
        for p in r["points"]:
            assert len(p["hits"]["concept_fidelity"]) == 6 * 4 and 0 <= p["retention_selection"] <= 1
    assert "| dopsd | 0.001 | 4 |" in (tmp_path / "results.md").read_text()
    # resumable: a lost evaluation is recomputed from the kept LoRA, nothing is retrained
    name = next(iter(runs))
    (tmp_path / "runs" / name / "result.json").unlink()
    lost = tmp_path / "runs" / name / "eval" / "step-000004.json"
    before = lost.read_text()
    lost.unlink()
    lora = tmp_path / "runs" / name / "train" / "lora-000004.safetensors"
    mtime = lora.stat().st_mtime_ns
    again = stages.run_study(tmp_path, "prune", log=lambda *_: None)
    assert lora.stat().st_mtime_ns == mtime and json.loads(lost.read_text()) == json.loads(before)
    assert again["summary"] == res["summary"]



def _name_and_pid(run, out, metrics, log=print):  # module level: the pool pickles it by name
    import os
    return run.name, os.getpid()


def _fail_first(item, out, metrics, log=print):  # a run that fails at once; the others take a while
    import time
    if item == 0:
        raise DopsdError("run 0 failed")
    time.sleep(0.3)
    (out / f"ran-{item}").touch()


def test_a_failed_run_stops_the_pool_instead_of_running_the_queue(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "HELD_OUT_SHAPES", ())  # no concept data to write for this fake fn
    with pytest.raises(DopsdError, match="run 0 failed"):
        stages.map_runs(_fail_first, list(range(12)), tmp_path, None, jobs=2)
    assert len(list(tmp_path.glob("ran-*"))) < 6  # at most the runs already handed to the workers

@needs_weights
def test_only_runs_one_self_contained_stage_without_the_ones_before_it(tmp_path, monkeypatch):
    plans = []
    monkeypatch.setattr(stages, "map_runs", lambda fn, plan, *a, **k: plans.append([r.name for r in plan]) or [])
    monkeypatch.setattr(stages, "StudyMetrics", lambda *a, **k: None)
    monkeypatch.setattr(stages, "report", lambda out: {})
    stages.run_study(tmp_path, "combos", only=True)
    assert plans == [[r.name for r in study.prune_plan()], [r.name for r in study.combo_plan()]]  # prune: cached
    with pytest.raises(DopsdError, match="needs the stages before it"):
        stages.run_study(tmp_path, "chains", only=True)


def test_two_jobs_run_the_stage_in_worker_processes_and_report_every_run(tmp_path, monkeypatch):
    import os
    monkeypatch.setattr(study, "CHECKPOINTS", (2,))
    monkeypatch.setattr(study, "LRS", (1e-3,))
    monkeypatch.setattr(study, "VARIANTS", (("sft", False), ("sft", True)))
    monkeypatch.setattr(stages, "METRIC_SIZES", TINY_METRICS)
    pids = []
    names = stages.map_runs(_name_and_pid, study.prune_plan(), tmp_path, None, jobs=2,
                           on_done=lambda: pids.append(os.getpid()))
    # results in plan order, computed in other processes; on_done ran in this one after each run
    assert [n for n, _ in names] == [r.name for r in study.prune_plan()]
    assert all(pid != os.getpid() for _, pid in names) and pids == [os.getpid()] * 2
    assert all(any((tmp_path / "data" / c).glob("*.png")) for c in ("star", "heart", "crescent"))
    res = stages.run_study(tmp_path / "real", "prune", log=lambda *_: None, jobs=2)
    assert sorted(r["variant"] for r in res["runs"].values()) == ["sft", "sft + prior"]
    assert all(len(r["points"][0]["hits"]["concept_fidelity"]) == 6 * 4 for r in res["runs"].values())

def _run(variant, seed, points, concept="star"):
    method, prior = ("dopsd" if variant.startswith("dopsd") else "sft"), "prior" in variant
    return {"variant": variant, "name": f"{variant}{seed}",
            "run": {"concept": concept, "method": method, "prior": prior, "lr": 1e-3, "seed": seed, "rank": 16},
            "points": points}


def _pt(step, fid_hits: str, sel, ret=0.5, leak=0.1, cross=0.2):
    return {"step": step, "model_evals": step * 10, "concept_fidelity": fid_hits.count("1") / len(fid_hits),
            "retention_selection": sel, "retention": ret, "leak": leak, "cross_token": cross,
            "hits": {"concept_fidelity": fid_hits}}


def test_main_summary_means_over_seeds_and_intervals_between_methods():
    ones, zeros = "1" * 96, "0" * 96
    runs = [_run("dopsd + prior", 0, [_pt(10, ones, 0.9)]), _run("dopsd + prior", 1, [_pt(10, ones, 0.85)]),
            _run("sft + prior", 0, [_pt(10, zeros, 0.9)]), _run("sft + prior", 1, [_pt(10, ones, 0.5)])]
    row = study_report.main_summary(runs)["star"]["0.8"]
    assert row["dopsd + prior"]["concept_fidelity"] == 1.0 and row["dopsd + prior"]["reached"] == 2
    # SFT seed 1 never reached 0.8: its fidelity counts 0, retention is the mean over the seed that did
    assert row["sft + prior"]["concept_fidelity"] == 0.0 and row["sft + prior"]["reached"] == 1
    assert row["sft + prior"]["retention"] == 0.5
    diff = row["dopsd + prior - sft + prior"]
    assert diff["diff"] == 1.0 and diff["lo"] == diff["hi"] == 1.0 and diff["runs"] == [2, 2]
    assert "dopsd - sft" not in row  # no plain variants in these runs


def test_equal_compute_gives_dopsd_only_the_sft_runs_model_evaluations():
    ones, zeros = "1" * 96, "0" * 96
    dopsd = _run("dopsd + prior", 0, [_pt(10, zeros, 0.9), _pt(40, ones, 0.9)])  # model_evals 100, 400
    sft = _run("sft + prior", 0, [_pt(10, zeros, 0.9), _pt(20, zeros, 0.9)])  # the whole run: 200 evals
    row = study_report.main_summary([dopsd, sft])["star"]["0.8"]
    assert row["dopsd + prior - sft + prior"]["diff"] == 1.0  # equal steps: D-OPSD's step 40 counts
    equal = row["dopsd + prior - sft + prior, equal compute"]
    assert equal["diff"] == 0.0 and equal["dopsd_fidelity"] == 0.0  # step 40 costs 400 > 200


def _concept_runs(variant, lr, fids, sels):
    return [_run(variant, 0, [_pt(200, "1" * int(96 * f) + "0" * (96 - int(96 * f)), s)], concept=c) | {"run": {
        "concept": c, "method": variant.split()[0], "prior": "prior" in variant, "lr": lr, "seed": 0, "rank": 16}}
        for c, f, s in zip(("star", "heart", "crescent"), fids, sels)]


def test_default_is_the_best_mean_fidelity_that_keeps_mean_retention():
    runs = (_concept_runs("dopsd", 1e-4, (1.0, 1.0, 1.0), (0.5, 0.6, 0.7))  # best fidelity, retention too low
            + _concept_runs("dopsd + prior", 1e-3, (0.5, 0.25, 0.75), (0.7, 0.8, 0.9))
            + _concept_runs("sft + prior", 3e-4, (0.25, 0.25, 0.25), (0.9, 0.9, 0.9)))
    d = study_report.default_choice(runs, tau=0.7)
    assert (d["variant"], d["lr"], d["step"], d["runs"]) == ("dopsd + prior", 1e-3, 200, 3)
    assert d["concept_fidelity"] == 0.5 and abs(d["retention_selection"] - 0.8) < 1e-9
    assert study_report.default_choice(runs[:2], tau=0.0) is None  # not every concept: no default
    lines = study_report.aims_table(d)
    assert "| concept_fidelity | >= 80% | 50% (not met) |" in lines


def test_chain_summary_keeps_share_against_each_concepts_own_run():
    def stage(concept, fids, ret):
        return {"concept": concept, "retention": ret,
                "concepts": {c: {"concept_fidelity": f, "leak": 0.1, "cross_token": 0.0} for c, f in fids.items()}}
    chains = [{"variant": "sft + prior", "method": "sft", "seed": s, "model_evals": 100,
               "stages": [stage("star", {"star": 0.8}, 0.8), stage("heart", {"star": 0.4, "heart": 0.6}, 0.7)]}
              for s in (0, 1)]
    single = {("star", "sft", 0): 0.8, ("star", "sft", 1): 0.8, ("heart", "sft", 0): 0.3, ("heart", "sft", 1): 0.9}
    s = chains_mod.chain_summary(chains, single)["sft + prior"]
    assert s["seeds"] == 2 and [st["concept"] for st in s["stages"]] == ["star", "heart"]
    assert s["kept"]["star"]["kept_share"] == 0.5 and s["kept"]["heart"]["kept_share"] == 1.0
    assert abs(s["stages"][1]["retention"] - 0.7) < 1e-12


def test_chain_end_difference_is_per_concept_with_an_interval_over_seeds_then_prompts():
    def chain(variant, method, seed, star, heart):  # 96 fidelity samples = 24 prompts x 4 seeds
        return {"variant": variant, "method": method, "seed": seed, "model_evals": 1,
                "stages": [{"concept": "heart", "retention": 0.9, "concepts": {
                    c: {"concept_fidelity": h.count("1") / 96, "leak": 0.0, "cross_token": 0.0, "fid_hits": h}
                    for c, h in (("star", star), ("heart", heart))}}]}
    a = [chain("dopsd + prior", "dopsd", s, "1" * 96, "1" * 48 + "0" * 48) for s in (0, 1, 2)]
    b = [chain("sft + prior", "sft", s, "0" * 96, "1" * 48 + "0" * 48) for s in (0, 1, 2)]
    s = chains_mod.chain_summary(a + b, {})
    d = s["dopsd + prior"]["minus_sft"]
    assert d["star"]["diff"] == 1.0 and d["star"]["lo"] == d["star"]["hi"] == 1.0  # every sample apart
    assert d["heart"]["diff"] == 0.0 and d["heart"]["lo"] < 0 < d["heart"]["hi"]  # same mean, prompts resampled
    assert "minus_sft" not in s["sft + prior"]
    assert "minus_ema_teacher" not in s["dopsd + prior"]  # no base-teacher chains here
    base = [chain("dopsd + prior, base teacher", "dopsd", s, "0" * 96, "1" * 96) for s in (0, 1, 2)]
    s = chains_mod.chain_summary(a + b + base, {})
    d = s["dopsd + prior, base teacher"]["minus_ema_teacher"]
    assert (d["star"]["diff"], d["heart"]["diff"]) == (-1.0, 0.5)
    assert "Base teacher minus EMA teacher after the chain (fidelity points, 95 % interval): star -100 [-100, -100], " \
           "heart +50 [" in "\n".join(study_report.chains_table(s))


@needs_weights
def test_a_tiny_chain_warm_starts_each_stage_and_measures_every_concept_so_far(tmp_path, monkeypatch):
    for mod in (study, chains_mod):
        monkeypatch.setattr(mod, "CHECKPOINTS", (2, 4))
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from dopsd_core.toy.evaluator import load_evaluator
    metrics = study.StudyMetrics(load_evaluator(), load_toy_file(BASE_WEIGHTS), **TINY_METRICS)
    kept = {"dopsd + prior": 1e-3, "sft + prior": 3e-4}
    chain = chains_mod.Chain("dopsd + prior", 0)
    r = chains_mod.run_chain(chain, tmp_path, metrics, kept, log=lambda *_: None)
    assert [s["concept"] for s in r["stages"]] == ["star", "heart", "crescent"]
    assert list(r["stages"][2]["concepts"]) == ["star", "heart", "crescent"] and r["teacher"] == "ema"
    # the crescent stage started from the heart stage's LoRA, whose concepts its prior prompts include
    from dopsd_core.lora import read_lora_file
    meta = read_lora_file(tmp_path / r["stages"][2]["lora"])[1]
    assert [c["trigger"] for c in json.loads(meta["dopsd.concepts"])] == ["[V1]", "[V2]", "[V3]"]
    assert r["stages"][2]["prior_prompts"] > r["stages"][1]["prior_prompts"]
    assert (tmp_path / "chains" / chain.name / "chain.json").is_file()
    again = chains_mod.run_chain(chain, tmp_path, metrics, kept, log=lambda *_: None)  # cached
    assert again == r
    # the EMA chain's teachers: each new concept with the warm start's LoRA, against the base's
    chains_mod.teacher_check(tmp_path, metrics, kept, log=lambda *_: None)
    t = chains_mod.teacher_summary(tmp_path)
    assert set(t) == {"heart", "crescent"} and all(0 <= v["warm_start"] <= 1 and v["chains"] == 1 for v in t.values())
    assert t["heart"]["base"] >= 0.8  # the shipped base copies the heart from its reference


def test_gap_points_and_their_summary_over_the_matched_points(tmp_path):
    from dopsd_core.fileio import save_json
    points = [_pt(10, "0" * 96, 0.9), _pt(20, "1" * 96, 0.75), _pt(40, "1" * 96, 0.5)]
    run = _run("sft + prior", 0, points) | {"name": "r0"}
    assert study.gap_points(run) == [10, 20]  # tau 0.8 -> step 10; 0.7 and 0.6 -> step 20; 40 never
    save_json({"quality_4": 100.0, "quality_32": 150.0, "few_step_gap": -50.0}, tmp_path / "base_gap.json")
    for step, q4, q32 in ((10, 200.0, 220.0), (20, 400.0, 300.0)):
        save_json({"step": step, "quality_4": q4, "quality_32": q32, "few_step_gap": q4 - q32},
                  tmp_path / "runs" / "r0" / "eval" / f"gap-{step:06d}.json")
    g = study_report.gap_summary(tmp_path, [run])
    assert g["base"]["few_step_gap"] == -50.0
    assert g["variants"]["sft + prior"]["0.8"] == {"points": 1, "quality_4": 200.0, "quality_32": 220.0,
                                                   "few_step_gap": -20.0}
    assert g["variants"]["sft + prior"]["0.6"]["few_step_gap"] == 100.0
    assert "| sft + prior | 0.7 | 1 | 400 | 300 | +100 |" in study_report.gap_table(g)


def test_lambda_table_compares_with_mains_run_of_the_same_lr():
    def run(name, lr, weight, fid):
        r = _run("dopsd + prior", 0, [_pt(200, "1" * int(96 * fid) + "0" * (96 - int(96 * fid)), 0.9)])
        r["run"].update(lr=lr, prior_weight=weight)
        return r | {"name": name}
    runs = {"prune_lr1e-4": run("prune_lr1e-4", 1e-4, 1.0, 0.75), "main": run("main", 1e-3, 1.0, 0.25),
            "w3": run("w3", 1e-3, 3.0, 0.5)}
    lines = study_report.lambda_table(runs, ["w3"])
    assert len(lines) == 4  # header, rule, lambda 1 (main's run at lr 1e-3) and lambda 3
    assert "| 1 | fid 25% @200" in lines[2] and "| 3 | fid 50% @200" in lines[3]


def test_one_state_runs_are_a_variant_of_their_own_and_leave_mains_names_alone():
    main = study.StudyRun("star", "dopsd", True, 1e-3, 0)
    one = study.StudyRun("star", "dopsd", True, 1e-3, 0, states="one")
    assert main.name == "star_dopsd_prior_lr0.001_r16_s0"  # the cached main runs keep their folders
    assert one.name == "star_dopsd_prior_onestate_lr0.001_r16_s0" and one.variant == study_report.ONE_STATE
    plan = study.one_state_plan({"dopsd + prior": 1e-3, "sft + prior": 1e-3})
    assert len(plan) == 9 and {r.concept for r in plan} == {"star", "heart", "crescent"}
    assert all(r.states == "one" and r.prior and r.method == "dopsd" for r in plan)


def test_one_state_against_sft_at_equal_compute_counts_only_checkpoints_within_the_sft_run():
    ones, zeros = "1" * 96, "0" * 96
    one = _run(study_report.ONE_STATE, 0, [_pt(10, ones, 0.9), _pt(40, ones, 0.9)])  # model_evals 100, 400
    one["points"][1]["concept_fidelity"] = 1.0
    one["points"][0]["hits"]["concept_fidelity"] = "1" * 48 + "0" * 48
    one["points"][0]["concept_fidelity"] = 0.5
    sft = _run("sft + prior", 0, [_pt(10, zeros, 0.9), _pt(20, zeros, 0.9)])  # the whole run: 200 evals
    row = study_report.main_summary([sft, one], study_report.ONE_STATE_PAIRS)["star"]["0.8"]
    pair = f"{study_report.ONE_STATE} - sft + prior"
    assert row[pair]["diff"] == 1.0  # equal steps: step 40 counts
    assert row[f"{pair}, equal compute"]["dopsd_fidelity"] == 0.5  # only step 10 (100 evals) fits in 200
    lines = study_report.one_state_table({"star": {"0.8": row}})
    assert lines[2].startswith("| star | 0.8 | 100% (1/1) | 0% (1/1) | +100 [+100, +100] | +50 [")


@needs_weights
def test_a_one_state_run_trains_with_one_state_and_counts_its_evaluations(tmp_path, monkeypatch):
    from dopsd_core.lora import read_lora_file
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from dopsd_core.toy.evaluator import load_evaluator
    monkeypatch.setattr(study, "CHECKPOINTS", (2,))
    metrics = study.StudyMetrics(load_evaluator(), load_toy_file(BASE_WEIGHTS), **TINY_METRICS)
    run = study.StudyRun("star", "dopsd", True, 1e-3, 0, states="one")
    r = study.run_one(run, tmp_path, metrics, log=lambda *_: None)
    assert r["variant"] == study_report.ONE_STATE and r["run"]["states"] == "one"
    assert r["points"][0]["model_evals"] == 2 * study.evals_per_step("dopsd", True, states="one") == 2 * 36
    meta = read_lora_file(tmp_path / "runs" / run.name / "train" / "lora-000002.safetensors")[1]
    assert meta["dopsd.states"] == "one"


def test_budget_runs_go_on_past_mains_checkpoints_under_names_of_their_own():
    plan = study.budget_plan()
    assert len(plan) == 18 and {r.variant for r in plan} == {"dopsd + prior", "sft + prior"}
    assert all(r.lr == study.BUDGET["lr"] and r.steps == study.BUDGET["steps"] for r in plan)
    assert plan[0].name == "star_dopsd_prior_lr0.003_r16_st400_s0"
    assert plan[0].checkpoints == study.CHECKPOINTS + (300, 400)
    assert study.StudyRun("star", "dopsd", True, 1e-3, 0).checkpoints == study.CHECKPOINTS


def test_budget_report_compares_the_methods_and_picks_a_default_at_that_budget(tmp_path, monkeypatch):
    from dopsd_core.fileio import save_json
    monkeypatch.setattr(study, "HELD_OUT_SHAPES", ("star",))
    save_json({"base": "b", "study": 1}, tmp_path / "stamp.json")
    fid = {"dopsd": "1" * 96, "sft": "1" * 48 + "0" * 48}
    for r in study.budget_plan():
        run = _run(r.variant, r.seed, [_pt(200, fid[r.method], 0.9), _pt(400, fid[r.method], 0.9)])
        run["run"].update(steps=400, lr=r.lr)
        save_json(run | {"name": r.name}, tmp_path / "runs" / r.name / "result.json")
    for c in ("heart", "crescent"):  # the default needs every concept: the same runs under the other names
        for r in study.budget_plan():
            run = _run(r.variant, r.seed, [_pt(400, fid[r.method], 0.9)], concept=c)
            run["run"].update(steps=400, lr=r.lr)
            name = r.name.replace("star", c)
            save_json(run | {"name": name}, tmp_path / "runs" / name / "result.json")
    monkeypatch.setattr(study, "HELD_OUT_SHAPES", ("star", "heart", "crescent"))
    b = study_report.report(tmp_path)["summary"]["budget"]
    assert len(b["runs"]) == 18 == b["planned"]
    row = b["by_concept"]["star"]["0.8"]
    assert row["dopsd + prior - sft + prior"]["diff"] == 0.5
    assert (b["default"]["variant"], b["default"]["step"], b["default"]["concept_fidelity"]) == ("dopsd + prior", 400, 1.0)
    md = (tmp_path / "results.md").read_text()
    assert "## A larger budget: lr 0.003, 400 steps (18 of 18 runs cached)" in md
    assert "| star | 0.8 | 100% (3/3) | 50% (3/3) | +50 [" in md
    assert b["shipped"] is None and "The toy's defaults" not in md  # the defaults' step 300 was not evaluated here
    import dataclasses
    monkeypatch.setattr(study_report, "TOY", dataclasses.replace(study_report.TOY, lr=3e-3, rank=16, steps=400,
                                                                 states="all", prior_every=1, prior_batch=4))
    b = study_report.report(tmp_path)["summary"]["budget"]
    assert (b["shipped"]["variant"], b["shipped"]["step"], b["shipped"]["runs"]) == ("dopsd + prior", 400, 9)
    assert "are dopsd + prior, lr 0.003, **step 400** (9 runs of this stage" in (tmp_path / "results.md").read_text()
    # defaults on a lever: the budget runs no longer match them, that lever's runs do
    monkeypatch.setattr(study_report, "TOY", dataclasses.replace(study_report.TOY, lr=3e-3, rank=16, steps=400,
                                                                 states="all", prior_every=4, prior_batch=4))
    assert study_report.report(tmp_path)["summary"]["budget"]["shipped"] is None
    for c in ("star", "heart", "crescent"):
        for seed in range(3):
            run = _run("dopsd + prior, prior every 4", seed, [_pt(400, "1" * 24 + "0" * 72, 0.9)], concept=c)
            run["run"].update(lr=3e-3, prior_every=4)
            save_json(run | {"name": f"{c}_every4_{seed}"}, tmp_path / "runs" / f"{c}_every4_{seed}" / "result.json")
    runs = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/result.json")]
    shipped = study_report.shipped_point(runs)
    assert (shipped["variant"], shipped["runs"], shipped["concept_fidelity"]) == ("dopsd + prior, prior every 4", 9, 0.25)


def test_the_defaults_meet_sft_at_their_own_model_evaluations(monkeypatch):
    import dataclasses
    monkeypatch.setattr(study_report, "TOY", dataclasses.replace(study_report.TOY, lr=1e-3, rank=16, steps=300,
                                                                 states="all", prior_every=1, prior_batch=4))
    concepts = ("star", "heart", "crescent")
    dopsd = [_run("dopsd + prior", s, [_pt(300, "1" * 96, 0.9)], concept=c) for c in concepts for s in range(3)]
    # SFT + prior: all-hit at 3,000 evaluations (step 300 of _pt's 10 a step), none at 4,000: only the first
    # is within the defaults' 3,000
    sft = [_run("sft + prior", s, [_pt(300, "1" * 48 + "0" * 48, 0.9), _pt(400, "1" * 96, 0.9)], concept=c)
           for c in concepts for s in range(3)]
    shipped = study_report.shipped_point(dopsd)
    assert shipped["model_evals"] == 3000
    assert study_report.shipped_equal_compute(dopsd, shipped, sft[:-1]) is None  # the long SFT runs incomplete
    ec = study_report.shipped_equal_compute(dopsd, shipped, sft)
    assert (ec["model_evals"], ec["step"]) == (3000, 300)
    star = ec["by_concept"]["star"]
    assert (star["dopsd_fidelity"], star["sft_fidelity"], star["diff"], star["sft_run_evals"]) == (1.0, 0.5, 0.5, 4000)
    assert study_report.shipped_equal_compute(dopsd, None, sft) is None


@needs_weights
def test_a_budget_run_trains_to_its_own_length_and_is_evaluated_past_mains_checkpoints(tmp_path, monkeypatch):
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from dopsd_core.toy.evaluator import load_evaluator
    monkeypatch.setattr(study, "CHECKPOINTS", (2,))
    monkeypatch.setattr(study, "LONG_EVERY", 2)
    metrics = study.StudyMetrics(load_evaluator(), load_toy_file(BASE_WEIGHTS), **TINY_METRICS)
    run = study.StudyRun("star", "dopsd", True, 3e-3, 0, steps=6)
    r = study.run_one(run, tmp_path, metrics, log=lambda *_: None)
    assert [p["step"] for p in r["points"]] == [2, 4, 6] and r["run"]["steps"] == 6
    assert r["points"][-1]["model_evals"] == 6 * study.evals_per_step("dopsd", True)
    assert (tmp_path / "runs" / run.name / "train" / "lora-000006.safetensors").is_file()


def test_the_budget_chains_start_from_the_budget_runs_checkpoint_and_keep_apart(monkeypatch):
    monkeypatch.setattr(study, "CHECKPOINTS", (2,))
    monkeypatch.setattr(study, "LONG_EVERY", 2)
    monkeypatch.setattr(chains_mod, "BUDGET", {"lr": 3e-3, "steps": 6})
    monkeypatch.setattr(chains_mod, "TOY_BUDGET_STEPS", 4)
    chain = chains_mod.Chain("sft + prior", 1, budget=True)
    assert chain.name == "sft_prior_budget_s1" and chains_mod.Chain("sft + prior", 1).name == "sft_prior_s1"
    # the first stage is the budget run's step-4 LoRA (the run itself goes on to step 6); needs no kept lr
    assert chain.first_run({}) == study.StudyRun("star", "sft", True, 3e-3, 1, steps=6) and chain.steps == 4
    assert chains_mod.chain_kind({"budget": True, "steps_per_stage": 4}) == "budget"
    assert chains_mod.chain_kind({"budget": False, "steps_per_stage": 200}) == "main"
    monkeypatch.setattr(chains_mod, "TOY_BUDGET_STEPS", 5)
    with pytest.raises(Exception, match="among its first run's checkpoints"):
        chains_mod.Chain("sft + prior", 1, budget=True).first_run({})


@needs_weights
def test_a_chain_at_a_picked_setting_trains_its_stages_with_the_settings_levers(tmp_path, monkeypatch):
    from dopsd_core.lora import read_lora_file
    from dopsd_core.run_folder import read_run_state
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from dopsd_core.toy.evaluator import load_evaluator
    monkeypatch.setattr(study, "CHECKPOINTS", (2,))
    monkeypatch.setattr(study, "LONG_EVERY", 2)
    monkeypatch.setattr(chains_mod, "ORIGIN", {"lr": 3e-3, "rank": 4, "steps": 4})
    monkeypatch.setitem(study.COMBOS, "cheap", dict(states="one", prior_every=2, prior_batch=1))
    metrics = study.StudyMetrics(load_evaluator(), load_toy_file(BASE_WEIGHTS), **TINY_METRICS)
    chain = chains_mod.Chain("dopsd + prior", 0, setting="cheap", at=2)
    r = chains_mod.run_chain(chain, tmp_path, metrics, {}, log=lambda *_: None)  # needs no kept lr
    first = study.StudyRun("star", "dopsd", True, 3e-3, 0, rank=4, steps=4, states="one", prior_every=2, prior_batch=1)
    # the first stage is the setting's run's step-2 LoRA (the run itself went on to step 4)
    assert r["stages"][0]["lora"] == f"runs/{first.name}/train/lora-000002.safetensors"
    assert (tmp_path / "runs" / first.name / "train" / "lora-000004.safetensors").is_file()
    step2 = json.loads((tmp_path / "runs" / first.name / "eval" / "step-000002.json").read_text())
    assert r["stages"][0]["concepts"]["star"]["concept_fidelity"] == step2["concept_fidelity"]
    assert (r["setting"], r["steps_per_stage"], r["rank"]) == ("cheap", 2, 4)
    assert chains_mod.chain_kind(r) == "cheap@2"
    for stage in r["stages"][1:]:  # every later stage trains with the first run's levers, for the chain's steps
        cfg = read_run_state(tmp_path / stage["lora"].rsplit("/", 1)[0])["config"]
        assert (cfg["states"], cfg["prior_every"], cfg["prior_batch"], cfg["rank"], cfg["steps"]) == ("one", 2, 1, 4, 2)
        assert read_lora_file(tmp_path / stage["lora"])[1]["dopsd.step"] == "2"
    per_step = study.evals_per_step("dopsd", True, states="one", prior_batch=1, prior_every=2)
    assert r["model_evals"] == 3 * 2 * per_step  # three stages of 2 steps at the setting's cost
    # the report's kept share: against the star's own run at the chain's step
    single = study_report._single_fidelity([json.loads((tmp_path / "runs" / first.name / "result.json").read_text())], 2)
    assert single == {("star", "dopsd", 0): step2["concept_fidelity"]}


@needs_weights
def test_the_adapter_runs_match_loras_trainable_parameters_and_are_evaluated_at_the_defaults_end():
    from dopsd_core.toy.denoiser import load_toy
    origin = study.ORIGIN
    plan = study.adapter_plan()
    assert len(plan) == 18 and {r.variant for r in plan} == {"dopsd + prior, lokr", "dopsd + prior, loha"}
    assert len({r.name for r in plan}) == 18 and plan[0].name == "star_dopsd_prior_lokr-f2_lr0.003_r32_st300_s0"
    assert all(r.checkpoints == (origin["steps"],) and r.lr == origin["lr"] for r in plan)
    den = load_toy()

    def trainable(**kw):
        return sum(p.numel() for p in den.add_lora(kw.pop("rank"), 1.0, **kw).parameters_list())
    lora = trainable(rank=origin["rank"])
    for adapter, setting in study.ADAPTER_SETTINGS.items():
        n = trainable(rank=setting["rank"], adapter=adapter, factor=setting.get("lokr_factor", -1))
        assert abs(n - lora) / lora < 0.001, (adapter, n, lora)


def test_the_adapter_report_gives_each_adapters_difference_to_lora_with_an_interval():
    def run(adapter, hits_fid, hits_ret, seed):
        point = {"step": 300, "concept_fidelity": hits_fid.count("1") / len(hits_fid), "retention": 0.9, "leak": 0.0,
                 "cross_token": 0.0, "hits": {"concept_fidelity": hits_fid, "retention": hits_ret, "leak": "00",
                                              "cross_token": "00"}}
        return {"run": {"adapter": adapter, "concept": "star", "seed": seed}, "points": [{"step": 200, **point}, point]}
    lora = [run("lora", "1111" * 4, "11", 0), run("lora", "1110" * 4, "11", 1), run("lora", "0000" * 4, "00", 2)]
    loha = [run("loha", "0000" * 4, "10", 0), run("loha", "1000" * 4, "11", 1)]  # compared with seeds 0, 1 only
    a = study_report.adapter_summary(loha, lora)
    assert a["arms"]["lora"]["runs"] == 3 and "minus_lora" not in a["arms"]["lora"] and "lokr" not in a["arms"]
    assert a["arms"]["loha"]["lora_runs_compared"] == 2
    d = a["arms"]["loha"]["minus_lora"]
    assert d["concept_fidelity"]["diff"] == pytest.approx(0.125 - 0.875)
    assert d["concept_fidelity"]["lo"] <= d["concept_fidelity"]["diff"] <= d["concept_fidelity"]["hi"] < 0
    assert d["retention"]["diff"] == pytest.approx(0.75 - 1.0)
    text = "\n".join(study_report.adapter_lines(a))
    assert "loha (rank 8)" in text and "-75 [" in text


def test_model_evaluations_of_the_cost_levers():
    assert study.rollout_evals("all") == 12 and study.rollout_evals("one") == 1.5 + 3
    # two of four states: the later one's index is 1..3 (mean 14/6); the states before it are stepped through
    assert study.rollout_evals("two") == pytest.approx(14 / 6 + 1 - 2 + 6)
    full = study.evals_per_step("dopsd", True, batch=4)
    assert full == 12 * (4 + study.PRIOR["prior_batch"]) == 96
    assert study.evals_per_step("dopsd", True, batch=4, prior_every=4) == 12 * (4 + study.PRIOR["prior_batch"] / 4)
    assert study.evals_per_step("dopsd", True, batch=4, prior_batch=1) == 12 * 5
    assert study.evals_per_step("dopsd", True, batch=4, prior_states="one") == 12 * 4 + 4.5 * 4
    assert study.evals_per_step("dopsd", True, batch=4, states="one", prior_states="all") == 4.5 * 4 + 12 * 4
    assert study.evals_per_step("sft", True, batch=4, prior_every=2) == 2 * (4 + 2)


def test_each_lever_is_one_change_from_the_defaults_under_a_name_of_its_own():
    plan = study.lever_plan()
    assert len(plan) == 9 * len(study.LEVERS) and len({r.name for r in plan}) == len(plan)
    default = study.StudyRun("star", "dopsd", True, study.ORIGIN["lr"], 0, steps=study.ORIGIN["steps"])
    names = {r.name for r in plan} | {r.name for r in study.budget_plan()} | {r.name for r in study.adapter_plan()}
    assert default.name not in names and len(names) == len(plan) + 36  # nothing shares a cache folder
    fields = ("lr", "rank", "states", "prior_every", "prior_states", "prior_batch")
    for change in study.LEVERS.values():
        runs = [r for r in plan if all(getattr(r, k) == v for k, v in change.items())]
        assert len(runs) == 9, change
        for r in runs:
            assert {k for k in fields if getattr(r, k) != getattr(default, k)} == set(change)
            assert r.checkpoints[-1] == study.ORIGIN["steps"] and r.prior and r.method == "dopsd"
    assert {r.variant for r in plan} == {
        "dopsd + prior, prior every 2", "dopsd + prior, prior every 4", "dopsd + prior, prior batch 1",
        "dopsd + prior, prior batch 2", "dopsd + prior, prior one state", "dopsd + prior, one state, prior all states",
        "dopsd + prior, two states, prior all states", "dopsd + prior, rank 64, lr 2e-3"}


def test_a_combination_runs_as_a_lever_and_may_run_longer_than_the_defaults(monkeypatch):
    monkeypatch.setattr(study, "COMBOS", {"cheap, longer": dict(states="one", prior_states="one", prior_every=4, steps=600)})
    plan = study.combo_plan()
    assert len(plan) == 9 and not {r.name for r in plan} & {r.name for r in study.lever_plan()}
    run = plan[0]
    assert run.checkpoints == study.CHECKPOINTS + (300, 400, 500, 600)  # each a candidate step count
    assert run.variant == "dopsd + prior, one state, prior every 4, prior one state"
    assert study.evals_per_step("dopsd", True, states="one", prior_states="one", prior_every=4) == 4.5 * 4 + 4.5
    assert study.setting_change("cheap, longer")["steps"] == 600 and "prior batch 1" in study.LEVERS


def test_a_longer_run_of_a_levers_settings_stands_for_it_in_the_levers_cells():
    from experiments.toy.lab import levers
    def run(seed, steps, fid, rank=64):
        r = _lever_run("dopsd + prior, rank 64, lr 2e-3", "star", seed,
                       [(st, st * 96, fid, 0.9, 0.9, 0.0) for st in range(100, steps + 1, 100)])
        r["run"].update(prior=True, lr=2e-3, rank=rank)
        return r
    short = [run(s, 300, 0.5) for s in range(3)]
    long = [run(s, 500, 0.8) for s in range(2)]  # two of three seeds run on so far
    other_rank = run(0, 500, 0.1, rank=32)  # other settings under the same name: kept apart
    kept = study_report.longest(short + long + [other_rank])
    assert kept == [short[2], *long, other_rank]
    cells = {c["step"]: c for c in levers.cells(kept[:3])}
    assert set(cells) == {100, 200, 300} and cells[300]["runs"] == 3  # 400 and 500 once the third seed ran on
    assert levers.cells(long + [run(2, 500, 0.8)])[-1]["step"] == 500


def _lever_run(variant, concept, seed, points):
    """points: (step, evals, fidelity, selection retention, retention, leak)."""
    pts = [{"step": st, "model_evals": ev, "concept_fidelity": f, "retention_selection": sel, "retention": ret,
            "leak": leak, "cross_token": 0.0,
            "hits": {"concept_fidelity": "1" * round(96 * f) + "0" * (96 - round(96 * f))}}
           for st, ev, f, sel, ret, leak in points]
    return {"variant": variant, "name": f"{variant}-{concept}-{seed}", "evals_per_step": points[-1][1] / points[-1][0],
            "run": {"concept": concept, "seed": seed, "method": variant.split()[0]}, "points": pts, "prior_prompts": 40}


def test_the_lever_rule_picks_the_cheapest_cell_meeting_every_aim_and_compares_sft_at_its_compute():
    from experiments.toy.lab import levers
    concepts, seeds = ("star", "heart", "crescent"), range(3)
    # the defaults meet every aim at step 300 only; a lever meets the mean aims cheaply at step 100 but leaves
    # the star at 0.6 there, and meets every aim at step 200 (6000 evaluations < the defaults' 9000 at 300)
    budget = [_lever_run("dopsd + prior", c, s, [(100, 3000, 0.5, 0.9, 0.9, 0.0), (300, 9000, 0.9, 0.9, 0.9, 0.0)])
              for c in concepts for s in seeds]
    budget += [_lever_run("sft + prior", c, s, [(100, 500, 0.4, 0.9, 0.9, 0.0), (400, 2000, 0.7, 0.85, 0.9, 0.0)])
               for c in concepts for s in seeds]
    lever = [_lever_run("dopsd + prior, lever", c, s,
                        [(100, 2000, 0.6 if c == "star" else 0.95, 0.9, 0.9, 0.0), (200, 4000, 0.85, 0.9, 0.9, 0.01)])
             for c in concepts for s in seeds]
    lever.append(_lever_run("dopsd + prior, partial", "star", 0, [(10, 10, 1.0, 1.0, 1.0, 0.0)]))  # 1 of 9 runs
    lv = levers.lever_summary(lever, budget)
    pick = lv["pick"]
    assert (pick["every_aim"]["variant"], pick["every_aim"]["step"]) == ("dopsd + prior, lever", 200)
    assert (pick["mean_aims"]["variant"], pick["mean_aims"]["step"]) == ("dopsd + prior, lever", 100)
    assert pick["mean_aims"]["fidelity_by_concept"]["star"] == pytest.approx(0.6)
    assert lv["reference"]["model_evals"] == 9000
    # equal compute at the pick's 4000 evaluations: SFT's whole run (2000) fits, its 0.7 at selection 0.85
    ec = lv["equal_compute"]
    assert ec["model_evals"] == 4000 and set(ec["by_concept"]) == set(concepts)
    star = ec["by_concept"]["star"]
    assert star["dopsd_fidelity"] == pytest.approx(0.85) and star["sft_fidelity"] == pytest.approx(0.7)
    assert star["diff"] == pytest.approx(0.85 - 0.7, abs=0.011) and star["lo"] <= star["diff"] <= star["hi"]
    # a tighter budget: only step 100 is within it
    small = levers.equal_compute(lever[:9], budget[9:], 2000)
    assert small["star"]["dopsd_fidelity"] == pytest.approx(0.6)
    text = "\n".join(study_report.lever_lines({**lv, "runs": [r["name"] for r in lever], "planned": 72}))
    assert "**dopsd + prior, lever, step 200**: 4,000 model evaluations" in text
    assert "| dopsd + prior, lever | 20 | 9 | 200 | 85% |" in text  # its last step (no step 300)
    assert "step 200 (4,000; 0.44)" in text  # a share of the defaults' 9,000
    img = levers.levers_figure(lv["cells"])
    assert img.size[0] == 900 and img.getpixel((5, 5)) == (255, 255, 255)


def test_an_adapter_is_recommended_only_with_every_run_in_and_an_interval_above_zero():
    def arm(runs, fid, ret=(0.0, -0.01, 0.01), leak=(0.0, -0.01, 0.01)):
        iv = lambda d, lo, hi: {"diff": d, "lo": lo, "hi": hi}  # noqa: E731
        return {"runs": runs, "minus_lora": {"concept_fidelity": iv(*fid), "retention": iv(*ret), "leak": iv(*leak),
                                             "cross_token": iv(0, 0, 0)}}
    a = {"runs": ["x"] * 18, "planned": 18, "arms": {"lokr": arm(9, (0.1, 0.02, 0.2)), "loha": arm(9, (0.05, -0.03, 0.1))}}
    text = study_report.adapter_verdict(a)
    assert text.startswith("lokr beats LoRA") and "Recommended on the toy" in text and "+10 [+2, +20]" in text
    a["arms"]["lokr"] = arm(9, (0.1, 0.02, 0.2), ret=(-0.05, -0.09, -0.01))  # better concept, worse retention
    assert study_report.adapter_verdict(a).startswith("Neither adapter beats LoRA")
    a["arms"]["loha"]["runs"] = 8
    assert "no adapter is recommended yet" in study_report.adapter_verdict({**a, "runs": ["x"] * 17})


def test_the_levers_stage_adds_long_sft_runs_under_names_of_their_own_and_the_report_uses_them():
    from experiments.toy.lab import levers
    long = study.sft_long_plan()
    stage = study.levers_stage_plan()
    assert len(stage) == len(study.lever_plan()) + 9 and stage[9:18] == long
    budget_names = {r.name for r in study.budget_plan()}
    assert not {r.name for r in long} & budget_names and all(r.method == "sft" and r.prior for r in long)
    assert long[0].checkpoints == tuple(range(100, 3001, 100))
    assert study.evals_per_step("sft", True) * long[0].steps == 48000  # the rank-64 combinations' 500 steps
    first = study.sft_long_plan(study.SFT_LONG_FIRST)  # the first long runs: 19,200 evaluations
    assert study.evals_per_step("sft", True) * first[0].steps == 19200 and first[0].checkpoints[-1] == 1200
    assert not {r.name for r in first} & {r.name for r in long}
    # the pinned origin: the levers' names do not move when the toy's defaults do
    assert all(r.lr == study.ORIGIN["lr"] or r.rank == 64 for r in study.lever_plan())
    concepts, seeds = ("star", "heart", "crescent"), range(3)
    budget = [_lever_run(v, c, s, [(100, 1000, 0.9, 0.9, 0.9, 0.0)]) for v in ("dopsd + prior", "sft + prior")
              for c in concepts for s in seeds]
    sft_long = [_lever_run("sft + prior", c, s, [(100, 1600, 0.5, 0.9, 0.9, 0.0), (1200, 19200, 0.95, 0.9, 0.9, 0.0)])
                for c in concepts for s in seeds]
    assert levers.lever_summary([], budget, sft_long[:8])["sft_runs"] == "budget"  # not all in: the budget's
    lv = levers.lever_summary([], budget, sft_long)
    sft_cells = [c for c in lv["cells"] if c["variant"] == "sft + prior"]
    assert lv["sft_runs"] == "long" and [c["step"] for c in sft_cells] == [100, 1200]


def test_chains_at_a_setting_train_every_stage_with_its_first_runs_settings():
    lever = "concept one state"
    dopsd = chains_mod.Chain("dopsd + prior", 1, setting=lever, at=200)
    sft = chains_mod.Chain("sft + prior", 1, setting=lever, at=200)
    first = dopsd.first_run({})
    assert first == study.StudyRun("star", "dopsd", True, seed=1, **{**study.ORIGIN, **study.LEVERS[lever]})
    assert first.name in {r.name for r in study.lever_plan()}  # the levers stage's run: cached, not retrained
    assert dopsd.steps == 200 and dopsd.lr({}) == study.ORIGIN["lr"]
    settings = study.train_settings(first)
    assert (settings["states"], settings["prior_states"], settings["rank"], settings["alpha"]) == ("one", "all", 16, 16.0)
    assert settings["prior_batch"] == study.PRIOR["prior_batch"] and settings["prior_every"] == 1
    # SFT has no roll-out states: its chain takes the setting's lr, rank and run length only, so a chain of
    # the picked defaults' length starts from a checkpoint its first run has
    assert sft.single_run("heart", {}) == study.StudyRun("heart", "sft", True, seed=1, **study.ORIGIN)
    combo = "rank 64, lr 2e-3, 500 steps"
    sft_at = chains_mod.Chain("sft + prior", 1, setting=combo, at=400)
    assert sft_at.first_run({}) == study.StudyRun("star", "sft", True, seed=1, lr=2e-3, rank=64, steps=500)
    assert 400 in sft_at.first_run({}).checkpoints
    names = {c.name for c in chains_mod.chain_plan(setting=lever, at=200)} | {c.name for c in chains_mod.chain_plan(True)}
    assert len(names) == 18  # no setting chain takes a budget chain's folder
    assert chains_mod.chain_kind({"setting": lever, "steps_per_stage": 200}) == f"{lever}@200"
    with pytest.raises(DopsdError, match="checkpoints"):
        chains_mod.Chain("dopsd + prior", 0, setting=lever, at=250).first_run({})
    with pytest.raises(DopsdError, match="no lever or combination"):
        chains_mod.Chain("dopsd + prior", 0, setting="half a lever", at=200).first_run({})

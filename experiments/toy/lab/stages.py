"""Runs the trade-off study's stages (study.py lists them), each resumable, then writes the report.

Runs are independent, so `jobs` > 1 trains and evaluates that many at once, one torch thread each (on
2 cores two 1-thread processes outrun one 2-thread process: the toy's matmuls are too small to split).
"""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from dopsd_core.errors import DopsdError
from dopsd_core.fileio import save_json
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.render import HELD_OUT_SHAPES
from dopsd_core.toy.runs import concept_data
from .chains import chain_plan, run_chain, teacher_check
from .study import (DEFAULTS_SETTING, N_SELECTION, N_UNRELATED, SMALL_RANK, StudyMetrics, adapter_plan, budget_plan,
                    combo_plan, gap_run, kept_lrs, lambda_plan, levers_stage_plan, main_plan, one_state_plan,
                    prune_plan, run_one)
from .study_report import report

STAGES = ("prune", "main", "gap", "chains", "lambda", "onestate", "budget", "budgetchains", "adapters", "levers",
          "combos", "defaultschains")
REPORT_EVERY_S = 60.0
# the evaluation's prompt-set sizes (ToyMetrics, StudyMetrics); the lab's tests shrink them
METRIC_SIZES = dict(n_unrelated=N_UNRELATED, n_selection=N_SELECTION)
_WORKER = None  # a forked worker's (metrics, log), inherited from the parent that started the pool


def _worker_init() -> None:
    torch.set_num_threads(1)  # also keeps OpenMP from touching the parent's thread pool after fork


def _worker_call(fn, item, out: Path, extra: tuple):
    metrics, log = _WORKER
    return fn(item, out, metrics, *extra, log=log)


def map_runs(fn, items: list, out: Path, metrics: StudyMetrics, *extra, jobs: int = 1, log=print,
             on_done=None) -> list:
    """fn(item, out, metrics, *extra, log=log) for every item, in `jobs` forked processes when jobs > 1;
    returns the results in items' order and calls on_done() after each (the report)."""
    if jobs <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item, out, metrics, *extra, log=log))
            if on_done:
                on_done()
        return results
    global _WORKER
    _WORKER = metrics, log
    for concept in HELD_OUT_SHAPES:  # the concepts' data folders, written once before workers read them
        concept_data(concept, out)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(_worker_call, fn, item, out, extra): i for i, item in enumerate(items)}
        results = [None] * len(items)
        try:
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                if on_done:
                    on_done()
        except BaseException:  # a failed run or Ctrl-C: don't start the queued ones (finished runs stay cached)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


# stages whose runs need nothing from an earlier stage but the prune's (cached) runs: `only` runs them alone
SELF_CONTAINED = {"budget": budget_plan, "adapters": adapter_plan, "levers": levers_stage_plan, "combos": combo_plan}


def run_study(out: Path, stage: str = "prune", log=print, jobs: int = 1, only: bool = False) -> dict:
    """Runs the stages up to and including `stage` that are not cached yet (each is resumable), then
    writes the report from everything cached. jobs: runs at once (map_runs). only: just `stage`'s runs
    (one of SELF_CONTAINED), e.g. the combinations before the last levers."""
    if stage not in STAGES:
        raise DopsdError(f"unknown study stage {stage!r}; choose one of {', '.join(STAGES)} (or report)")
    if only and stage not in SELF_CONTAINED:
        raise DopsdError(f"--only runs one of {', '.join(SELF_CONTAINED)} alone; {stage!r} needs the stages "
                         "before it: drop --only")
    out = Path(out)
    base = load_toy_file(BASE_WEIGHTS)
    stamp = {"base": base.fingerprint(), "study": 1}
    stamp_file = out / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) != stamp:
        raise DopsdError(f"{out} holds a study of another toy base ({stamp_file}); use a new --out folder")
    save_json(stamp, stamp_file)
    metrics = StudyMetrics(load_evaluator(), base, **METRIC_SIZES)
    # a study cut short still reports what it has: the report after a run, at most once a minute (a stage
    # whose runs are cached returns them at once, and a report over every run takes seconds)
    last = [0.0]

    def report_now() -> None:
        if time.monotonic() - last[0] >= REPORT_EVERY_S:
            report(out)
            last[0] = time.monotonic()
    each = dict(jobs=jobs, log=log, on_done=report_now)
    prune = map_runs(run_one, prune_plan(), out, metrics, **each)
    todo = STAGES[:STAGES.index(stage) + 1]
    if only:
        map_runs(run_one, SELF_CONTAINED[stage](), out, metrics, **each)
    elif "main" in todo:
        kept = kept_lrs(prune)
        main = map_runs(run_one, main_plan(kept), out, metrics, **each)
        if "gap" in todo:
            base_file = out / "base_gap.json"
            if not base_file.is_file():
                save_json(metrics.few_step_quality(base), base_file)
            map_runs(gap_run, [r for r in main if r["run"]["rank"] != SMALL_RANK], out, metrics, **each)
        if "chains" in todo:
            map_runs(run_chain, chain_plan(), out, metrics, kept, **each)
            teacher_check(out, metrics, kept, log)
        if "lambda" in todo:
            map_runs(run_one, lambda_plan(kept), out, metrics, **each)
        if "onestate" in todo:
            map_runs(run_one, one_state_plan(kept), out, metrics, **each)
        if "budget" in todo:
            map_runs(run_one, SELF_CONTAINED["budget"](), out, metrics, **each)
        if "budgetchains" in todo:
            map_runs(run_chain, chain_plan(budget=True), out, metrics, kept, **each)
            teacher_check(out, metrics, kept, log)
        for name in ("adapters", "levers", "combos"):
            if name in todo:
                map_runs(run_one, SELF_CONTAINED[name](), out, metrics, **each)
        if "defaultschains" in todo:
            setting, at = DEFAULTS_SETTING
            if not setting:
                raise DopsdError("the toy's defaults have not been picked from the levers and combos stages yet "
                                 "(study.DEFAULTS_SETTING); run --stage combos and read its report first")
            plan = chain_plan(setting=setting, at=at)
            for chain in plan:  # a chain whose first run lacks the step fails here, not after the singles trained
                chain.first_run(kept)
            # each concept's own run at the setting: the kept shares' reference (SFT's are not in any stage)
            singles = list(dict.fromkeys(c.single_run(concept, kept) for c in plan for concept in HELD_OUT_SHAPES))
            map_runs(run_one, singles, out, metrics, **each)
            map_runs(run_chain, plan, out, metrics, kept, **each)
            teacher_check(out, metrics, kept, log)
    return report(out)

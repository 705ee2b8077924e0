"""Server side of the live training view (web/dopsd.js).

Each trainer node's latest run is kept in memory while the server lives (loss points, step/total,
speed, latest preview) and pushed to every open page as `dopsd.progress` / `dopsd.preview` events;
`GET /dopsd/runs` serves every record whole, so a page opened or reloaded mid-run redraws the
curve it missed. Each run start gets a new run id, so a page tells a re-queued run of the same node
from the one before. Preview PNGs stay in the run folder; `GET /dopsd/preview` serves them by run
name and file name only (no paths).

Nothing here touches the training math; the trainer node calls these hooks from its callbacks.
"""
from __future__ import annotations

import itertools
import math
import re
import threading
import time
from pathlib import Path
from urllib.parse import quote

MAX_POINTS = 20000  # loss points kept per run (beyond this, every other point is dropped)

_lock = threading.Lock()
_runs: dict[str, dict] = {}  # trainer node id -> its latest run record (JSON-able)
_ids = itertools.count(1)
_session = f"{int(time.time()):x}"  # run ids stay unique across server restarts


def _finite(x) -> float | None:
    """JSON has no NaN/inf (the page's JSON.parse rejects them): non-finite numbers travel as null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # outside ComfyUI (unit tests of the records)
        return
    # sid None: every open page, also one opened or reloaded mid-run (a reload may get a new client id)
    PromptServer.instance.send_sync(event, data, None)


def _current_prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return ctx.prompt_id if ctx is not None else None


def run_started(node_id: str, run_name: str, method: str, total: int, start_step: int = 0) -> str:
    """A trainer node starts (or resumes) a run; returns the new run id."""
    node_id = str(node_id)
    run_id = f"{_session}-{next(_ids)}"
    with _lock:
        _runs[node_id] = {"id": run_id, "node": node_id, "run": run_name, "method": method,
                          "prompt_id": _current_prompt_id(), "total": int(total), "step": int(start_step),
                          "points": [], "it_per_s": None, "eta_s": None, "preview": None, "start": None,
                          "status": "running",
                          "saved_step": None, "note": None,
                          "started": time.time()}
    _send("dopsd.progress", snapshot(node_id))
    return run_id


def _record(node_id: str, run_id: str) -> dict | None:
    rec = _runs.get(str(node_id))
    return rec if rec is not None and rec["id"] == run_id else None


def run_step(node_id: str, run_id: str, step: int, total: int, loss: float, lr: float, it_per_s: float,
             eta_s: float, prior_loss: float | None = None) -> None:
    """A finished step; points are [step, loss, the prior term's loss or None] (the page's two curves)."""
    with _lock:
        rec = _record(node_id, run_id)
        if rec is None:
            return
        loss = _finite(loss)
        prior_loss = None if prior_loss is None else _finite(prior_loss)
        rec["points"].append([int(step), loss, prior_loss])
        if len(rec["points"]) > MAX_POINTS:
            rec["points"] = rec["points"][::2]
        rec.update(step=int(step), total=int(total), it_per_s=_finite(it_per_s), eta_s=_finite(eta_s))
        event = {"id": run_id, "node": rec["node"], "run": rec["run"], "step": int(step), "total": int(total),
                 "loss": loss, "prior_loss": prior_loss, "lr": _finite(lr), "it_per_s": rec["it_per_s"],
                 "eta_s": rec["eta_s"], "status": "running"}
    _send("dopsd.progress", event)


def run_preview(node_id: str, run_id: str, step: int, png: Path) -> None:
    """A preview grid; step 0's is the starting model's (kept as `start`, shown beside every later one)."""
    with _lock:
        rec = _record(node_id, run_id)
        if rec is None:
            return
        shown = {"step": int(step), "url": preview_url(rec["run"], Path(png).name)}
        rec["start" if step == 0 else "preview"] = shown
        event = {"id": run_id, "node": rec["node"], "run": rec["run"], **shown}
    _send("dopsd.preview", event)


def run_note(node_id: str, run_id: str, text: str, ok: bool = True) -> None:
    """A line the page shows under the run's stats (the teacher check's result); ok False draws it as a
    warning."""
    with _lock:
        rec = _record(node_id, run_id)
        if rec is None:
            return
        rec["note"] = {"text": str(text), "ok": bool(ok)}
        event = {"id": run_id, "node": rec["node"], "run": rec["run"], "step": rec["step"], "total": rec["total"],
                 "status": rec["status"], "note": rec["note"]}
    _send("dopsd.progress", event)


def run_finished(node_id: str, run_id: str, status: str, saved_step: int | None = None) -> None:
    """status: finished | cancelled | error. saved_step: the step the run folder holds afterwards (a
    Cancel inside a step keeps the step before the one on screen); the page shows it."""
    with _lock:
        rec = _record(node_id, run_id)
        if rec is None:
            return
        rec["status"] = status
        rec["saved_step"] = None if saved_step is None else int(saved_step)
        rec["eta_s"] = None
        event = {"id": run_id, "node": rec["node"], "run": rec["run"], "status": status, "step": rec["step"],
                 "total": rec["total"], "saved_step": rec["saved_step"]}
    _send("dopsd.progress", event)


def snapshot(node_id: str) -> dict:
    with _lock:
        rec = _runs[str(node_id)]
        return {**rec, "points": [list(p) for p in rec["points"]]}


def all_runs() -> list[dict]:
    with _lock:
        return [{**rec, "points": [list(p) for p in rec["points"]]} for rec in _runs.values()]


def preview_url(run_name: str, file_name: str) -> str:
    return f"/dopsd/preview?run={quote(run_name, safe='')}&file={quote(file_name, safe='')}"


RUN_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a plain folder name, never a path
_PREVIEW_FILE = re.compile(r"step_\d{6,}\.png")


def preview_path(output_dir: Path, run_name: str, file_name: str) -> Path | None:
    """The preview file of a run, or None when the names are not a run's preview (no path escapes)."""
    if not RUN_NAME.fullmatch(run_name or "") or not _PREVIEW_FILE.fullmatch(file_name or ""):
        return None
    path = Path(output_dir) / "dopsd" / run_name / "previews" / file_name
    return path if path.is_file() else None


def register_routes() -> None:
    """GET /dopsd/runs (every run's record) and GET /dopsd/preview?run=&file= (a preview PNG).
    ComfyUI also serves every route under /api/."""
    import folder_paths
    from aiohttp import web
    from server import PromptServer
    routes = PromptServer.instance.routes

    @routes.get("/dopsd/runs")
    async def _runs_route(request):
        return web.json_response({"runs": all_runs()}, headers={"Cache-Control": "no-store"})

    @routes.get("/dopsd/preview")
    async def _preview_route(request):
        path = preview_path(Path(folder_paths.get_output_directory()), request.query.get("run", ""),
                            request.query.get("file", ""))
        if path is None:
            return web.Response(status=404, text="no such D-OPSD preview")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

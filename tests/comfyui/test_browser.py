"""The shipped workflows and the live training view in ComfyUI's real frontend, in headless Chromium.

Needs COMFYUI_PATH (like all of tests/comfyui), the `playwright` Python package and a Chromium binary
(Debian: `apt-get install chromium`; CHROMIUM_PATH overrides /usr/bin/chromium). Playwright drives
that system browser; it downloads nothing. Without them these tests skip and say why.

Screenshots go to <pytest tmp>/browser_artifacts/; with DOPSD_UPDATE_SCREENSHOTS=1 the mid-run and
finished toy graphs also replace the README's docs/images/dopsd_toy_{midrun,finished}.png.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from comfyui.hostutil import fresh_name

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
MODEL_LOADERS = {"UNETLoader", "CLIPLoader", "VAELoader", "DOPSDQwen3VLLoader", "LoraLoaderModelOnly"}


def _update_readme_image(shot, name: str) -> None:
    """The README's screenshots come from this test, refreshed only on request (DOPSD_UPDATE_SCREENSHOTS=1):
    a plain run, CI's included, leaves the checkout as it was."""
    if os.environ.get("DOPSD_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "images" / name)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    path = tmp_path_factory.mktemp("browser_artifacts")
    print(f"\n[browser artifacts] {path}")
    return path


@pytest.fixture(scope="module")
def browser(comfy):
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser test: pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"browser test: no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                              "--disable-dev-shm-usage"])
        yield b
        b.close()


class Page:
    """One tab on the ComfyUI server: collects uncaught exceptions and console errors; requests that
    leave the loopback server are refused (the machine is offline, so is CI)."""

    def __init__(self, browser, comfy):
        self.comfy = comfy
        self.page = browser.new_page(viewport={"width": 1600, "height": 1000})
        self.page.set_default_timeout(600_000)  # a busy 2-core machine serves the frontend slowly
        self.errors: list[str] = []
        self.page.route(lambda url: not url.startswith(comfy.url), lambda route: route.abort())
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

    def open(self):
        # a first visit opens the template browser over the canvas; this user has seen it
        status, _ = self.comfy.post("/settings", {"Comfy.TutorialCompleted": True})
        assert status == 200
        self.page.goto(self.comfy.url, wait_until="domcontentloaded")
        self.wait_app()
        self.page.keyboard.press("Escape")  # close any dialog that still opened

    def wait_app(self):
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                                    "&& window.LiteGraph.registered_node_types['DOPSDTrainer']", timeout=300_000)

    def load(self, workflow: dict):
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.page.wait_for_timeout(500)

    def page_errors(self) -> list[str]:
        # 404s of ComfyUI's own optional user files (user.css, userdata listings) are not errors of ours
        return [e for e in self.errors if not e.startswith("console: Failed to load resource")]

    def live_views(self) -> list[dict]:
        return self.page.evaluate("""() => [...document.querySelectorAll('.dopsd-live')].map(r => ({
            node: r.dataset.node, points: Number(r.dataset.points), run: r.dataset.run || '',
            status: r.dataset.status, stats: r.querySelector('.dopsd-stats').textContent,
            preview: (() => { const i = r.querySelector('.dopsd-preview');
                              return i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0; })(),
            curvePixels: (() => { const c = r.querySelector('.dopsd-curve'); const d = c.getContext('2d')
                .getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] > 120 && d[i + 1] < 220 && d[i + 2] < 120) n++;
                return n; })(),   // pixels of the orange smoothed line
            start: (() => { const i = r.querySelector('.dopsd-start');
                            return i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0; })(),
            priorPoints: Number(r.dataset.priorPoints || 0),
            priorPixels: (() => { const c = r.querySelector('.dopsd-curve'); const d = c.getContext('2d')
                .getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] < 120 && d[i + 1] > 170 && d[i + 2] > 90 && d[i + 2] < 160) n++;
                return n; })(),   // pixels of the green prior-term line
            caption: r.querySelector('.dopsd-caption').textContent,
        }))""")

    def click_run(self):
        self.page.get_by_role("button", name=re.compile(r"^\s*Run\s*$")).first.click()


def _widget_index(comfy, node_type: str, name: str) -> int:
    info = comfy.get(f"/object_info/{node_type}")[node_type]
    i = 0
    for section in ("required", "optional"):
        for inp in info["input_order"].get(section, []):
            spec = info["input"][section][inp]
            kind, opts = spec[0], (spec + [{}])[1]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if inp == name:
                    return i
                i += 1
                flag = opts.get("control_after_generate")
                if flag or (flag is None and kind == "INT" and inp in ("seed", "noise_seed")):
                    i += 1
    raise KeyError(name)


def _edit(comfy, workflow: dict, node_type: str, **values) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["type"] == node_type:
            for name, value in values.items():
                node["widgets_values"][_widget_index(comfy, node_type, name)] = value
    return wf


def _wait(page, predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = page.live_views()
        if predicate(last):
            return last
        assert page.comfy.proc.poll() is None, "ComfyUI died"
        page.page.wait_for_timeout(250)
    raise AssertionError(f"timed out waiting for {what}; live views: {last}; errors: {page.page_errors()}")


@pytest.fixture(scope="module")
def loader_page(comfy, browser):
    page = Page(browser, comfy)
    page.open()
    yield page
    page.page.close()


def test_the_server_lists_the_workflows_as_templates(comfy):
    listed = comfy.get("/workflow_templates")
    assert sorted(listed.get("ComfyUI-D-OPSD", [])) == sorted(p.stem for p in WORKFLOWS)


def _finished_entry(comfy, marker: str, timeout: float = 600) -> dict:
    """The history entry of the finished prompt whose graph contains marker (a run name)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = next((h for h in comfy.get("/history").values() if marker in json.dumps(h["prompt"][2])), None)
        if entry and entry["status"].get("completed") is not None:
            return entry
        time.sleep(1)
    raise AssertionError(f"no finished prompt with {marker}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shipped_workflow_loads_without_errors_or_missing_nodes(comfy, loader_page, artifacts, path):
    page = loader_page
    page.errors.clear()
    workflow = json.loads(path.read_text())
    page.load(workflow)
    state = page.page.evaluate("""() => {
        const g = window.app.graph, s = g.serialize(), reg = window.LiteGraph.registered_node_types;
        return {
          unregistered: g.nodes.filter(n => !reg[n.type]).map(n => n.type),
          nodes: s.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? []})),
          links: [...(g.links instanceof Map ? g.links.values() : Object.values(g.links))].filter(l => l)
            .map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot]),
          dangling: [...(g.links instanceof Map ? g.links.values() : Object.values(g.links))]
            .filter(l => l && (!g.getNodeById(l.origin_id) || !g.getNodeById(l.target_id))).map(l => l.id),
          flagged: g.nodes.filter(n => n.has_errors).map(n => ({type: n.type,
            values: (n.widgets || []).filter(w => w.options && Array.isArray(w.options.values))
                      .filter(w => !w.options.values.includes(w.value)).map(w => w.value)})),
          live: document.querySelectorAll('.dopsd-live').length,
        };
    }""")
    page.page.screenshot(path=str(artifacts / f"load_{path.stem}.png"))
    assert state["unregistered"] == [], f"missing node types: {state['unregistered']}"
    assert state["dangling"] == []
    # the frontend keeps every link and every widget value of the file (no slot or widget shifted)
    assert sorted(tuple(l[:5]) for l in state["links"]) == sorted(tuple(l[:5]) for l in workflow["links"])
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in state["nodes"]:
        assert node["widgets_values"] == by_id[node["id"]]["widgets_values"], f"{node['type']} {node['id']}"
    # only model loaders may be flagged, for model files this server does not have (the note lists them)
    note = "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("MarkdownNote", "Note"))
    if "toy" in path.stem:  # "no model files are needed": nothing may be flagged, the LoRA loader included
        assert state["flagged"] == [], state["flagged"]
    for node in state["flagged"]:
        assert node["type"] in MODEL_LOADERS, f"{node['type']} has errors after loading"
        assert node["values"] and all(v in note for v in node["values"]), node
    trainers = [n for n in workflow["nodes"] if n["type"] in ("DOPSDTrainer", "DOPSDSFTTrainer")]
    assert state["live"] == len(trainers), "every trainer node gets a live view"
    assert page.page_errors() == []


def test_toy_workflow_queued_from_the_page_draws_loss_and_preview_and_survives_reload(comfy, browser, artifacts):
    run, lora = fresh_name("browser_toy"), fresh_name("dopsd/browser_toy")
    workflow = json.loads((ROOT / "workflows" / "dopsd_toy_cpu_demo.json").read_text())
    workflow = _edit(comfy, workflow, "DOPSDTrainer", steps=40, preview_every=5, save_every=20, run_name=run)
    workflow = _edit(comfy, workflow, "DOPSDSaveLoRA", name=lora)
    page = Page(browser, comfy)
    page.open()
    page.load(workflow)
    page.page.wait_for_timeout(1000)
    page.click_run()

    views = _wait(page, lambda v: v and v[0]["run"] == run and v[0]["points"] >= 10 and v[0]["preview"] > 0,
                  300, "10 loss points and a preview")
    view = views[0]
    assert view["status"] == "running" and view["curvePixels"] > 20, view
    assert re.search(r"step \d+/40", view["stats"]) and "it/s" in view["stats"] and "ETA" in view["stats"]
    page.page.screenshot(path=str(artifacts / "toy_midrun.png"))
    _update_readme_image(artifacts / "toy_midrun.png", "dopsd_toy_midrun.png")

    # a reload mid-run redraws the curve from the server's history, then keeps following the run
    points_before = view["points"]
    page.page.reload()
    page.wait_app()
    views = _wait(page, lambda v: v and v[0]["run"] == run and v[0]["points"] >= points_before, 60,
                  "the curve after a reload")
    page.page.screenshot(path=str(artifacts / "toy_after_reload.png"))

    # the last preview may still be loading when the status turns finished (a busy machine): wait for both
    views = _wait(page, lambda v: v and v[0]["status"] == "finished" and v[0]["preview"] > 0, 600,
                  "the end of the run and its last preview")
    assert views[0]["points"] == 40 and "step 40/40" in views[0]["stats"]
    # the starting model's samples (step 0) above the latest, and the prior term as a second curve (the
    # toy workflow's dataset has prior_prompts auto: every step rolls the prior out)
    v = views[0]
    assert v["start"] > 0 and v["start"] == v["preview"], v
    assert v["priorPoints"] == 40 and v["priorPixels"] > 20, v
    assert "starting model" in v["caption"] and "prior term (green)" in v["caption"], v["caption"]
    assert (comfy.output_dir / "dopsd" / run / "previews" / "step_000000.png").is_file()
    # the page's log toggle redraws on a log axis
    page.page.locator(".dopsd-log").first.check()
    assert page.live_views()[0]["points"] == 40
    assert page.page.evaluate("() => document.querySelector('.dopsd-live').dataset.scale") == "log"

    # the graph ran to the end: the stock loader loaded the saved file and the stock KSampler sampled it
    entry = _finished_entry(comfy, run)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (comfy.loras_dir / f"{lora}.safetensors").is_file()
    after = next(n for n in workflow["nodes"] if n.get("title") == "After")
    assert entry["outputs"][str(after["id"])]["images"], "no 'After' image"
    page.page.wait_for_timeout(1000)
    page.page.screenshot(path=str(artifacts / "toy_finished.png"))
    _update_readme_image(artifacts / "toy_finished.png", "dopsd_toy_finished.png")
    assert page.page_errors() == []
    page.page.close()


def test_two_trainers_in_one_graph_each_draw_their_own_run(comfy, browser, artifacts):
    tag = fresh_name("browser_pair")
    workflow = json.loads((ROOT / "workflows" / "dopsd_toy_sft_vs_dopsd.json").read_text())
    for node in workflow["nodes"]:  # distinct run names per trainer, short runs
        if node["type"] in ("DOPSDTrainer", "DOPSDSFTTrainer"):
            values = node["widgets_values"]
            values[_widget_index(comfy, node["type"], "run_name")] += "_" + tag
            values[_widget_index(comfy, node["type"], "steps")] = 12
            values[_widget_index(comfy, node["type"], "preview_every")] = 6
    page = Page(browser, comfy)
    page.open()
    page.load(workflow)
    page.page.wait_for_timeout(1000)
    page.click_run()
    # the preview image decodes asynchronously after the last event (under load it lagged "finished")
    views = _wait(page, lambda v: len(v) == 2 and all(x["status"] == "finished" and x["preview"] > 0 for x in v),
                  600, "both trainers to finish and show a preview")
    page.page.screenshot(path=str(artifacts / "sft_vs_dopsd_finished.png"))
    runs = {v["run"] for v in views}
    assert runs == {f"toy_star_dopsd_{tag}", f"toy_star_sft_{tag}"}
    assert all(v["points"] == 12 and v["preview"] > 0 and v["curvePixels"] > 20 for v in views), \
        [{k: v[k] for k in ("node", "points", "preview", "curvePixels")} for v in views]
    server = {r["run"]: r for r in comfy.get("/dopsd/runs")["runs"]}
    for v in views:  # each view shows its own trainer's run, as the server recorded it
        assert server[v["run"]]["node"] == v["node"]
    assert {server[r]["method"] for r in runs} == {"dopsd", "sft"}
    # the rest of the graph ran: one grid image, rows base / D-OPSD / SFT
    entry = _finished_entry(comfy, tag)
    assert entry["status"]["status_str"] == "success", entry["status"]
    grid_view = next(n for n in workflow["nodes"] if n["type"] == "SaveImage")
    images = entry["outputs"][str(grid_view["id"])]["images"]
    from PIL import Image
    with Image.open(comfy.output_dir / images[0]["subfolder"] / images[0]["filename"]) as grid:
        assert len(images) == 1 and grid.size == (4 * 128 + 3 * 4, 3 * 128 + 2 * 4)
    assert page.page_errors() == []
    page.page.close()

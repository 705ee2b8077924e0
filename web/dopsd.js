// Live training view for the D-OPSD trainer nodes: loss curve (raw + smoothed, log-scale toggle),
// step/total, it/s, ETA and the latest few-step preview, drawn inside each trainer node.
//
// The server (nodes/live.py) keeps each trainer node's latest run and pushes `dopsd.progress` /
// `dopsd.preview` events; a page opened or reloaded mid-run asks GET /dopsd/runs for the history.
// Runs are keyed by the trainer's node id, so several trainers (one prompt or several queued) each
// draw their own run; every run start has a new run id, so a re-queued run replaces the last one.
// Everything the user or the server names (run names, numbers) is set with textContent, never HTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINERS = new Set(["DOPSDTrainer", "DOPSDSFTTrainer"]);
const SMOOTHING = 0.9; // exponential moving average of the loss, as TensorBoard's slider
const runs = new Map(); // trainer node id (string) -> run record {id, run, step, total, points, ...}
const views = new Set(); // live views; a node's id is read when needed (it is -1 while the node is created)

function el(tag, style, text) {
  const e = document.createElement(tag);
  if (style) Object.assign(e.style, style);
  if (text !== undefined) e.textContent = text;
  return e;
}

function formatSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

function smooth(values) {
  const out = [];
  let last = null;
  for (const v of values) {
    last = last === null ? v : SMOOTHING * last + (1 - SMOOTHING) * v;
    out.push(last);
  }
  return out;
}

function createView(node) {
  if (node.dopsdView) return node.dopsdView;
  const root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%",
    font: "11px sans-serif", color: "var(--input-text, #ddd)", boxSizing: "border-box" });
  root.className = "dopsd-live";
  root.dataset.points = "0";
  root.dataset.status = "idle";
  const header = el("div", { display: "flex", justifyContent: "space-between", alignItems: "center", gap: "6px" });
  const stats = el("span", { overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" },
    "D-OPSD: not started");
  stats.className = "dopsd-stats";
  const logLabel = el("label", { cursor: "pointer", whiteSpace: "nowrap" });
  const logBox = el("input");
  logBox.type = "checkbox";
  logBox.className = "dopsd-log";
  logBox.title = "logarithmic loss axis";
  logLabel.append(logBox, document.createTextNode(" log"));
  header.append(stats, logLabel);
  const canvas = el("canvas", { width: "100%", height: "120px", background: "rgba(0,0,0,0.25)",
    borderRadius: "4px" });
  canvas.className = "dopsd-curve";
  // the starting model's samples (step 0) above the latest ones, on the same noise and prompts
  const start = el("img", { width: "100%", imageRendering: "pixelated", display: "none", borderRadius: "4px" });
  start.className = "dopsd-start";
  start.alt = "the starting model's samples of the preview prompts";
  const preview = el("img", { width: "100%", imageRendering: "pixelated", display: "none", borderRadius: "4px" });
  preview.className = "dopsd-preview";
  preview.alt = "latest D-OPSD preview samples";
  preview.addEventListener("load", () => { root.dataset.previewLoaded = preview.dataset.src || ""; });
  const caption = el("span", { opacity: "0.7" });
  caption.className = "dopsd-caption";
  // the teacher check's result (or any other note of the run); a failed check is drawn as a warning
  const note = el("span", { whiteSpace: "pre-wrap", display: "none" });
  note.className = "dopsd-note";
  root.append(header, note, canvas, start, preview, caption);
  const view = { node, root, stats, canvas, start, preview, caption, logBox, note };
  logBox.addEventListener("change", () => draw(view));
  const widget = node.addDOMWidget("dopsd_live", "dopsd_live", root, { serialize: false, getMinHeight: () => 180 });
  widget.serialize = false; // not a value: keeps it out of the workflow's widgets_values
  node.dopsdView = view;
  views.add(view);
  const chain = (name, fn) => {
    const previous = node[name];
    node[name] = function () {
      const r = previous?.apply(this, arguments);
      fn();
      return r;
    };
  };
  chain("onRemoved", () => views.delete(view));
  chain("onAdded", () => refresh(view)); // the node now has its id in the graph
  chain("onConfigure", () => refresh(view)); // ... or the id of the workflow it was loaded from
  setTimeout(() => refresh(view), 0);
  return view;
}

function refresh(view) {
  view.root.dataset.node = String(view.node.id);
  const rec = runs.get(String(view.node.id));
  if (rec) render(view, rec);
}

function draw(view) {
  const rec = runs.get(String(view.node.id));
  const canvas = view.canvas;
  const w = (canvas.width = Math.max(120, canvas.clientWidth || 300));
  const h = (canvas.height = Math.max(60, canvas.clientHeight || 120));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const points = rec ? rec.points.filter((p) => p[1] !== null && isFinite(p[1])) : [];
  const log = view.logBox.checked;
  const shown = log ? points.filter((p) => p[1] > 0) : points;
  view.root.dataset.points = String(shown.length);
  view.root.dataset.scale = log ? "log" : "linear";
  if (shown.length < 2) return;
  const tf = (y) => (log ? Math.log10(y) : y);
  const xs = shown.map((p) => p[0]);
  const raw = shown.map((p) => tf(p[1]));
  const avg = smooth(shown.map((p) => p[1])).map(tf);
  // the prior term alone (steps that rolled it out): the run's own measure of drift on unrelated prompts
  const prior = shown.filter((p) => p[2] !== null && p[2] !== undefined && isFinite(p[2]) && (!log || p[2] > 0));
  view.root.dataset.priorPoints = String(prior.length);
  const priorAvg = smooth(prior.map((p) => p[2])).map(tf);
  const x0 = xs[0], x1 = Math.max(xs[xs.length - 1], x0 + 1);
  let lo = Infinity, hi = -Infinity;
  for (const y of raw.concat(priorAvg)) { if (y < lo) lo = y; if (y > hi) hi = y; }
  if (hi - lo < 1e-12) { hi += 0.5; lo -= 0.5; }
  const pad = 14;
  const px = (x) => pad + ((x - x0) / (x1 - x0)) * (w - 2 * pad);
  const py = (y) => h - pad - ((y - lo) / (hi - lo)) * (h - 2 * pad);
  const line = (ys, colour, width, at = xs) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    ys.forEach((y, i) => (i ? ctx.lineTo(px(at[i]), py(y)) : ctx.moveTo(px(at[i]), py(y))));
    ctx.stroke();
  };
  line(raw, "rgba(120,170,255,0.45)", 1);
  line(avg, "rgb(255,170,60)", 2);
  if (prior.length >= 2) line(priorAvg, "rgb(80,200,120)", 2, prior.map((p) => p[0]));
  ctx.fillStyle = "rgba(220,220,220,0.8)";
  ctx.font = "10px sans-serif";
  const label = (y) => (log ? `1e${y.toFixed(1)}` : y.toPrecision(3));
  ctx.fillText(label(hi), 2, 10);
  ctx.fillText(label(lo), 2, h - 3);
  const last = `step ${xs[xs.length - 1]}`;
  ctx.fillText(last, w - ctx.measureText(last).width - 2, h - 3);
}

// A stopped run names the step its folder holds: a Cancel inside a step keeps the step before it.
function statusText(rec) {
  const saved = rec.saved_step;
  if (rec.status === "cancelled") {
    return saved === null || saved === undefined ? "cancelled (nothing saved)" : `cancelled at step ${saved} (saved)`;
  }
  if (rec.status === "error" && saved !== null && saved !== undefined) return `error (step ${saved} saved)`;
  return String(rec.status);
}

// Points an image at a preview URL once (a new src only when the file changes).
function showImage(img, url) {
  const src = api.apiURL(url);
  if (img.dataset.src === src) return;
  img.dataset.src = src;
  img.src = src;
  img.style.display = "block";
}

function render(view, rec) {
  const lastPoint = rec.points.length ? rec.points[rec.points.length - 1][1] : null;
  const parts = [String(rec.run ?? ""), `step ${rec.step}/${rec.total}`];
  if (lastPoint !== null && lastPoint !== undefined) parts.push(`loss ${Number(lastPoint).toPrecision(4)}`);
  if (rec.it_per_s) parts.push(`${Number(rec.it_per_s).toFixed(2)} it/s`);
  parts.push(rec.status === "running" ? `ETA ${formatSeconds(rec.eta_s)}` : statusText(rec));
  view.stats.textContent = parts.join("  ·  ");
  if (rec.note) {
    view.note.textContent = rec.note.text;
    view.note.style.display = "";
    view.note.style.color = rec.note.ok ? "" : "#f5a623";
    view.root.dataset.note = rec.note.ok ? "ok" : "warning";
  } else {
    view.note.style.display = "none";
  }
  view.stats.title = view.stats.textContent;
  view.root.dataset.status = String(rec.status);
  view.root.dataset.node = String(view.node.id);
  view.root.dataset.run = String(rec.run ?? "");
  view.root.dataset.step = String(rec.step);
  if (rec.start) showImage(view.start, rec.start.url);
  if (rec.preview) {
    showImage(view.preview, rec.preview.url);
    view.caption.textContent = (rec.start ? "top: the starting model; below: " : "") +
      `the student at step ${rec.preview.step} (same prompts and noise, few steps)` +
      (rec.points.some((p) => p[2] !== null && p[2] !== undefined) ? " · curve: loss (orange), prior term (green)" : "");
  } else if (view.preview.dataset.src) {
    delete view.preview.dataset.src;
    view.preview.removeAttribute("src");
    view.preview.style.display = "none";
    view.caption.textContent = "";
  }
  draw(view);
  view.node.setDirtyCanvas?.(true, false);
}

function show(key) {
  const rec = runs.get(key);
  if (!rec) return;
  for (const view of views) if (String(view.node.id) === key) render(view, rec);
}

// A whole record (run start, or the server's history). Points of the same run that arrived as
// events after the server took its snapshot are kept.
function setRecord(rec) {
  const key = String(rec.node);
  const mine = runs.get(key);
  const points = rec.points.map((p) => [p[0], p[1], p[2] ?? null]);
  if (mine && mine.id !== rec.id && (mine.started ?? Infinity) > rec.started) return; // an older run of the node
  if (mine && mine.id === rec.id) {
    const lastStep = points.length ? points[points.length - 1][0] : -Infinity;
    for (const p of mine.points) if (p[0] > lastStep) points.push(p);
    if (mine.step > rec.step) rec = { ...rec, step: mine.step, it_per_s: mine.it_per_s, eta_s: mine.eta_s };
    if (mine.status !== "running") rec = { ...rec, status: mine.status, saved_step: mine.saved_step };
    if (mine.note && !rec.note) rec = { ...rec, note: mine.note };
    if (mine.preview && (!rec.preview || mine.preview.step > rec.preview.step)) rec = { ...rec, preview: mine.preview };
    if (mine.start && !rec.start) rec = { ...rec, start: mine.start };
  }
  runs.set(key, { ...rec, points });
  show(key);
}

// One event of a run. An event of a run this page has not seen (opened mid-run) starts a record
// that the history request fills in.
function patchRecord(detail, patch) {
  const key = String(detail.node);
  let rec = runs.get(key);
  if (!rec || rec.id !== detail.id) {
    rec = { id: detail.id, node: key, run: detail.run, step: 0, total: 0, points: [], status: "running",
      preview: null, start: null, it_per_s: null, eta_s: null };
    runs.set(key, rec);
    loadHistory();
  }
  Object.assign(rec, patch);
  return rec;
}

let historyRequest = null;
function loadHistory() {
  if (historyRequest) return historyRequest;
  historyRequest = (async () => {
    try {
      const resp = await api.fetchApi("/dopsd/runs", { cache: "no-store" });
      if (!resp.ok) return;
      const { runs: list } = await resp.json();
      const live = new Set();
      for (const rec of list) {
        live.add(rec.id);
        setRecord(rec);
      }
      for (const [key, rec] of runs) { // the server restarted: its runs are gone
        if (!live.has(rec.id) && rec.status === "running") {
          rec.status = "stopped (server restarted)";
          show(key);
        }
      }
    } catch (err) {
      console.warn("D-OPSD: could not load the run history", err);
    } finally {
      historyRequest = null;
    }
  })();
  return historyRequest;
}

app.registerExtension({
  name: "dopsd.live",
  async setup() {
    api.addEventListener("dopsd.progress", ({ detail }) => {
      if (Array.isArray(detail.points)) return setRecord(detail); // a run starts: its whole record
      const patch = { run: detail.run, step: detail.step, total: detail.total, status: detail.status };
      if (detail.saved_step !== undefined) patch.saved_step = detail.saved_step;
      if (detail.note !== undefined) patch.note = detail.note;
      if (detail.it_per_s !== undefined) Object.assign(patch, { it_per_s: detail.it_per_s, eta_s: detail.eta_s });
      const rec = patchRecord(detail, patch);
      if (detail.loss !== undefined) {
        const last = rec.points[rec.points.length - 1];
        if (!last || last[0] < detail.step) rec.points.push([detail.step, detail.loss, detail.prior_loss ?? null]);
      }
      show(String(detail.node));
    });
    api.addEventListener("dopsd.preview", ({ detail }) => {
      const shown = { step: detail.step, url: detail.url };
      patchRecord(detail, detail.step === 0 ? { start: shown } : { preview: shown });
      show(String(detail.node));
    });
    api.addEventListener("reconnected", () => loadHistory());
    await loadHistory();
  },
  async nodeCreated(node) {
    if (TRAINERS.has(node.comfyClass)) createView(node);
  },
});

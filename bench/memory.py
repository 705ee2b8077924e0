"""Memory of one training step (D-OPSD and SFT) by category: measured on the CPU, fitted, projected to CUDA.

    python bench/memory.py                 # measure, fit, validate, project -> bench/results/memory.json
    python bench/memory.py --project-only  # re-fit and re-project from the measured points in that file
    python bench/memory.py --tiny --out X  # the same code path at tiny dims (the CI test; seconds)

What is measured. The bench's real-shape stand-ins (bench/shapes.py: full width, real Linear shapes,
random weights) run one training step of the trainer (dopsd_core.trainer) on the CPU under a tracker of
tensor bytes (`MemoryTracker`, a TorchDispatchMode: every storage an op creates is counted until it is
freed; process RSS is not used). Each storage gets a category when it appears:

  static (exist before the step): base weights, LoRA (student), EMA teacher LoRA, anchor LoRA (the
  prior's teacher; every run holds one), optimizer state (the optimizer is primed before the step),
  data (latents and contexts of the records);
  dynamic: gradients (the LoRA .grad, re-tagged when autograd accumulates them), activations (student
  forward: what autograd saves, and temporaries), backward (checkpoint recompute and temporaries),
  teacher forward (no grad: everything allocated under inference_mode), base weight casts (the fp8
  stored weight cast to the compute dtype inside each Linear), optimizer step, other.

The step's peak is the maximum of all live bytes; its breakdown by category is the snapshot at that
moment. Two phase peaks are kept as well: the largest dynamic bytes (without gradients) while the
teacher runs (inference mode) and while the student runs forward and backward.

The CPU runs at reduced depth (1-2 blocks of each kind at full width) and small resolutions, with the
base stored in fp8 (1 byte per weight, as the GPU presets' fp8 files) and computed in fp32 (bf16 matmuls
are ~35x slower than fp32 on this CPU), LoRA in fp32.

The fit. Per family, checkpointing and phase, dynamic bytes = c0 + c1 T + c2 (n_a T) + c3 (n_b T), with T
the phase's joint token count (student: image + text; klein's teacher: 2 x image + text; Z-Image's
teacher: image + the Qwen3-VL context) and n_a, n_b the block counts (klein: double, single; Z-Image:
main layers, refiner pairs). Weight casts are fitted as a constant (one layer's cast copy).

The projection to a CUDA device (computed): static bytes from exact counts on the meta device (base at
1 B/param for fp8 or 2 for bf16, LoRA/grads in bf16, AdamW states 2 x 2 B/param, 8-bit AdamW as
bitsandbytes stores it), plus max(student phase, teacher phase) x the bf16/fp32 ratio that a reduced-width run measures in
both dtypes (`dtype_check`, about 0.5), plus gradients. The validation runs a
deeper model at a larger resolution than any fitted point and compares projected and measured peaks.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import shapes  # noqa: E402
from dopsd_core.denoiser import Record  # noqa: E402
from dopsd_core.family_spec import DEFAULT_PRESET, spec_named  # noqa: E402
from dopsd_core.trainer import TrainConfig, Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "memory.json"
STATIC = ("base weights", "LoRA (student)", "EMA teacher LoRA", "anchor LoRA", "optimizer state", "data")
DYNAMIC = ("gradients", "activations (student forward)", "backward (recompute, temporaries)",
           "teacher forward (no grad)", "base weight casts", "optimizer step", "other")
CATEGORIES = STATIC + DYNAMIC
GIB = 2 ** 30
CARDS_GB = (12, 16, 24)
CARD_RESERVE_GIB = 1.25  # CUDA context (~0.5 GiB), cuBLAS workspace and allocator slack, not in max_memory_allocated
ALIGN = 512  # the CUDA caching allocator rounds every block up to 512 bytes
MODELS = ("klein4b", "klein9b", "zimage")
TITLES = {"klein4b": "FLUX.2-klein-4B", "klein9b": "FLUX.2-klein-9B", "zimage": "Z-Image-Turbo"}
BASES = ("fp8", "bf16")
RESOLUTIONS = (768, 1024)


# --- the instrument -------------------------------------------------------------------------------------
class _Rec:
    __slots__ = ("nbytes", "cat", "ref")


_CASTS = (torch.ops.aten._to_copy, torch.ops.aten.to)


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes by category (see the module docstring). Storages that exist before the mode
    starts are counted only when `register`ed; everything an op creates inside it is counted until freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, _Rec] = {}
        self.by_cat = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak, self.peak_by_cat = 0, dict(self.by_cat)
        self.phase: str | None = None  # forces a category ("optimizer step", "other")
        self.phase_peak = {"teacher": 0, "student": 0}
        self.phase_by_cat = {"teacher": dict(self.by_cat), "student": dict(self.by_cat)}
        self._static_cats = STATIC

    def _add(self, st: torch.UntypedStorage, cat: str) -> None:
        k = id(st)
        if k in self.live:
            return
        rec = _Rec()
        rec.nbytes, rec.cat = st.nbytes(), cat
        rec.ref = weakref.ref(st, lambda _r, k=k: self._free(k))
        self.live[k] = rec
        self.by_cat[cat] += rec.nbytes
        self.total += rec.nbytes

    def _free(self, k: int) -> None:
        rec = self.live.pop(k, None)
        if rec is not None:
            self.by_cat[rec.cat] -= rec.nbytes
            self.total -= rec.nbytes

    def register(self, tensors, cat: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), cat)

    def retag(self, t: torch.Tensor, cat: str) -> None:
        rec = self.live.get(id(t.untyped_storage()))
        if rec is not None and rec.cat != cat:
            self.by_cat[rec.cat] -= rec.nbytes
            self.by_cat[cat] += rec.nbytes
            rec.cat = cat

    def _category(self, func, args) -> str:
        if self.phase:
            return self.phase
        # a cast of a stored weight: _to_copy under autograd, to.dtype under inference mode (no decomposition)
        if func.overloadpacket in _CASTS and args and isinstance(args[0], torch.Tensor):
            rec = self.live.get(id(args[0].untyped_storage()))
            if rec is not None and rec.cat == "base weights":
                return "base weight casts"
        if torch.is_inference_mode_enabled():
            return "teacher forward (no grad)"
        if torch._C._current_autograd_node() is not None:
            return "backward (recompute, temporaries)"
        return "activations (student forward)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        cat = None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if id(st) not in self.live:
                    cat = cat or self._category(func, args)
                    self._add(st, cat)
        self._update()
        return out

    def _update(self) -> None:
        if self.total > self.peak:
            self.peak, self.peak_by_cat = self.total, dict(self.by_cat)
        dyn = self.total - sum(self.by_cat[c] for c in self._static_cats) - self.by_cat["gradients"]
        ph = "teacher" if torch.is_inference_mode_enabled() else "student"
        if dyn > self.phase_peak[ph]:
            self.phase_peak[ph], self.phase_by_cat[ph] = dyn, dict(self.by_cat)

    @contextlib.contextmanager
    def forced(self, cat: str):
        previous, self.phase = self.phase, cat
        try:
            yield
        finally:
            self.phase = previous


# --- one measured step ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """One training-step configuration. `spec` None = the model's real widths (shapes.SPECS)."""
    model: str
    nd: int  # klein: double blocks; Z-Image: main layers
    ns: int  # klein: single blocks; Z-Image: refiner layers of each kind
    resolution: int
    text: int  # student text tokens (klein: caption; Z-Image: caption feature length)
    teacher_text: int  # klein: caption + suffix; Z-Image: the Qwen3-VL context length
    method: str = "dopsd"
    checkpointing: bool = True
    optimizer: str = "adamw8bit"
    rank: int = 16
    store: str = "fp8"  # base weights as stored: fp8 | bf16 | fp32
    compute: str = "fp32"  # the Linear compute dtype (and the LoRA's)
    k: int = 1
    tiny: bool = False

    def spec(self) -> shapes.Spec:
        s = TINY_SPECS[self.model] if self.tiny else shapes.SPECS[self.model]
        return replace(s, depth=self.nd, depth_single=self.ns)


TINY_SPECS = {name: replace(s, hidden=64, heads=2, context_dim=32, mlp_hidden=96)
              for name, s in shapes.SPECS.items()}
DT = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(setup: Setup, device="cpu") -> torch.nn.Module:
    s = setup.spec()
    store, compute = DT[setup.store], DT[setup.compute]

    def mk(i, o):
        return shapes.Linear(i, o, store=store, compute=compute, device=device)
    torch.manual_seed(0)
    model = (shapes.Flux2Like if s.kind == "flux2" else shapes.NextDiTLike)(s, mk)
    return model.eval().requires_grad_(False)


def tokens(setup: Setup) -> dict:
    """Joint token counts of the student and the teacher, and the features of the fit."""
    s = setup.spec()
    side = setup.resolution // (s.downsample * s.patch)
    img = side * side
    student = img + setup.text
    teacher = (2 * img if s.kind == "flux2" else img) + setup.teacher_text
    return {"image": img, "student": student, "teacher": teacher}


def features(kind: str, nd: int, ns: int, t: int) -> list[float]:
    """c0 + c1 T + c2 (n_a T) + c3 (n_b T): klein n_a/n_b = double/single blocks; Z-Image = main layers /
    refiner pairs (a noise refiner on the image tokens + a context refiner on the caption = T tokens)."""
    return [1.0, float(t), float(nd * t), float(ns * t)]


def make_records(den, setup: Setup, device, n: int = 2) -> list[Record]:
    s = den.spec
    g = torch.Generator().manual_seed(0)
    dt = DT[setup.compute]
    records = []
    for i in range(n):
        x0 = torch.randn(den.latent_shape, generator=g).to(device)
        text = torch.randn(1, setup.text, s.context_dim, generator=g).to(device, dt)
        t_text = torch.randn(1, setup.teacher_text, s.context_dim, generator=g).to(device, dt)
        teacher = shapes.BenchContext(t_text, x0[None]) if s.kind == "flux2" else shapes.BenchContext(t_text)
        records.append(Record(f"r{i}", x0, ["c"], [shapes.BenchContext(text)], [teacher]))
    return records


def make_trainer(setup: Setup, model, device, run_dir: Path) -> Trainer:
    den = shapes.ShapesDenoiser(setup.model, model, setup.resolution, DT[setup.compute])
    records = make_records(den, setup, device)
    cfg = TrainConfig(method=setup.method, steps=10 ** 6, rank=setup.rank, alpha=float(setup.rank), lr=1e-4,
                      optimizer=setup.optimizer, batch_size=1, k=setup.k, states="all",
                      checkpointing=setup.checkpointing, seed=0)
    tr = Trainer(den, records, cfg, run_dir)
    # prime the optimizer: its state exists from here on, as in every step after the first
    for p in tr.params:
        p.grad = torch.zeros_like(p)
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)
    return tr


def static_tensors(tr: Trainer, model) -> dict[str, list[torch.Tensor]]:
    lora = tr.lora
    opt_state = [v for st in tr.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    data = []
    for r in tr.records:
        data.append(r.x0)
        for c in r.student_ctx + r.teacher_ctx:
            data += [c.text] + ([c.ref] if c.ref is not None else [])
    return {"base weights": list(model.parameters()) + list(model.buffers()),
            "LoRA (student)": tr.params,
            "EMA teacher LoRA": [t for d in lora.teacher.values() for t in d.values()],
            "anchor LoRA": [t for d in lora.anchor.values() for t in d.values()],
            "optimizer state": opt_state, "data": data}


def tracked_step(tr: Trainer, model) -> MemoryTracker:
    """One train_step under the tracker; static tensors registered first."""
    tracker = MemoryTracker()
    for cat, ts in static_tensors(tr, model).items():
        tracker.register(ts, cat)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "gradients")) for p in tr.params]
    opt_step, clip = tr.opt.step, torch.nn.utils.clip_grad_norm_

    def step(*a, **kw):
        with tracker.forced("optimizer step"):
            return opt_step(*a, **kw)

    def clip_norm(*a, **kw):
        with tracker.forced("other"):
            return clip(*a, **kw)
    tr.opt.step, torch.nn.utils.clip_grad_norm_ = step, clip_norm
    try:
        with tracker:
            tr.train_step()
    finally:
        tr.opt.step, torch.nn.utils.clip_grad_norm_ = opt_step, clip
        for h in hooks:
            h.remove()
    return tracker


def measure(setup: Setup) -> dict:
    """Build, prime, and measure one step of `setup` on the CPU."""
    t0 = time.perf_counter()
    model = build(setup)
    with tempfile.TemporaryDirectory(prefix="dopsd-mem-") as d:
        tr = make_trainer(setup, model, "cpu", Path(d) / "run")
        tracker = tracked_step(tr, model)
        tr.lora.detach()
    out = {"setup": setup.__dict__, "tokens": tokens(setup), "peak_bytes": tracker.peak,
           "peak_by_category": {k: v for k, v in tracker.peak_by_cat.items()},
           "phase_peak_bytes": dict(tracker.phase_peak), "phase_by_category": tracker.phase_by_cat,
           "seconds": round(time.perf_counter() - t0, 1)}
    del tr, model, tracker
    gc.collect()
    return out


# --- static bytes, computed ---------------------------------------------------------------------------
def bnb_state_bytes(numels: list[int]) -> int:
    """bitsandbytes AdamW8bit (min_8bit_size=0, as dopsd_core.optim): per tensor two uint8 states and one
    fp32 absmax per 256 elements for each; two 256-entry fp32 quantile maps shared by all tensors
    (checked against the tracker: `static_check`)."""
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in numels) + (2 * 256 * 4 if numels else 0)


@dataclass
class StaticCounts:
    base_params: int
    base_linear_shapes: list  # (out, in) of every Linear, in model order
    lora_shapes: list  # (out, in) of every LoRA target
    blocks: list = field(default_factory=list)  # (name, params) per transformer block


_COUNTS: dict = {}


def static_counts(model: str, nd: int | None = None, ns: int | None = None, tiny: bool = False) -> StaticCounts:
    key = (model, nd, ns, tiny)
    if key not in _COUNTS:
        s = TINY_SPECS[model] if tiny else shapes.SPECS[model]
        s = replace(s, depth=s.depth if nd is None else nd, depth_single=s.depth_single if ns is None else ns)

        def mk(i, o):
            return shapes.Linear(i, o, device="meta")
        m = (shapes.Flux2Like if s.kind == "flux2" else shapes.NextDiTLike)(s, mk)
        from dopsd_core.lora import find_targets
        mods = dict(m.named_modules())
        targets = find_targets(m, spec_named(s.family).lora_targets)
        import re
        rx = re.compile(spec_named(s.family).blocks)
        blocks = [(n, sum(p.numel() for p in mod.parameters())) for n, mod in m.named_modules() if rx.fullmatch(n)]
        _COUNTS[key] = StaticCounts(sum(p.numel() for p in m.parameters()),
                                    [tuple(x.weight.shape) for x in m.modules() if isinstance(x, shapes.Linear)],
                                    [tuple(mods[t].weight.shape) for t in targets], blocks)
    return _COUNTS[key]


def static_bytes(counts: StaticCounts, rank: int, optimizer: str, store_b: int, lora_b: int,
                 data_b: int = 0) -> dict:
    """Bytes of everything that lives through the whole step (gradients included: all present from the
    second supervised state on), computed from the shapes."""
    lora_n = [rank * (o + i) for o, i in counts.lora_shapes]
    n = sum(lora_n)
    lora_tensors = [rank * i for o, i in counts.lora_shapes] + [o * rank for o, i in counts.lora_shapes]
    # AdamW: exp_avg and exp_avg_sq in the parameter's dtype, and one fp32 step scalar per tensor
    opt = bnb_state_bytes(lora_tensors) if optimizer == "adamw8bit" else 2 * n * lora_b + 4 * len(lora_tensors)
    return {"base weights": counts.base_params * store_b, "LoRA (student)": n * lora_b,
            "EMA teacher LoRA": n * lora_b, "anchor LoRA": n * lora_b, "optimizer state": opt,
            "data": data_b, "gradients": n * lora_b, "lora_params": n}


def data_bytes(model: str, resolution: int, text: int, teacher_text: int, compute_b: int, tiny=False,
               records: int = 2) -> int:
    """The bench's records: latent x0 (fp32) + student and teacher contexts (compute dtype), `records` of them."""
    s = TINY_SPECS[model] if tiny else shapes.SPECS[model]
    side = resolution // s.downsample
    lat = s.latent_channels * side * side * 4
    return records * (lat + (text + teacher_text) * s.context_dim * compute_b)


# --- fit ------------------------------------------------------------------------------------------------
def lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution[:, 0]
    return sol.tolist()


PHASES = ("student", "teacher", "sft")  # D-OPSD's student and teacher phases; SFT's whole step


def fit(points: list[dict]) -> dict:
    """Per (model, checkpointing) and phase, dynamic bytes without weight casts as linear functions of the
    features; casts as one constant (median). The phases' peaks of dynamic bytes without gradients: D-OPSD's
    student and teacher phases, SFT's step ("sft"). Gradients are counted as static, whole (D-OPSD: all
    present from its second state on; SFT: an upper bound, they grow during its one backward; fitting
    them would book per-block bytes as per-token ones). Fitted on measured points."""
    out = {}
    groups: dict = {}
    for p in points:
        s = p["setup"]
        groups.setdefault((s["model"], s["checkpointing"], bool(s.get("tiny"))), []).append(p)
    for (model, ckpt, tiny), pts in groups.items():
        kind = (TINY_SPECS if tiny else shapes.SPECS)[model].kind
        entry = {}
        for phase in PHASES:
            rows, ys, casts = [], [], []
            for p in pts:
                s = p["setup"]
                if (s["method"] == "sft") != (phase == "sft"):
                    continue
                cats = p["phase_by_category"]["student" if phase == "sft" else phase]
                y = p["phase_peak_bytes"]["student" if phase == "sft" else phase]
                t = p["tokens"]["student" if phase == "sft" else phase]
                casts.append(cats["base weight casts"])
                ys.append(y - cats["base weight casts"])
                rows.append(features(kind, s["nd"], s["ns"], t))
            if not rows:
                continue
            coef = lstsq(rows, ys)
            pred = [sum(c * f for c, f in zip(coef, r)) for r in rows]
            entry[phase] = {"coef": coef, "cast_bytes": sorted(casts)[len(casts) // 2], "points": len(rows),
                            "max_rel_residual": max(abs(a - b) / b for a, b in zip(pred, ys))}
        out[fit_key(model, ckpt, tiny)] = entry
    return out


def fit_key(model: str, checkpointing: bool, tiny: bool = False) -> str:
    return f"{model}|{'ckpt' if checkpointing else 'no-ckpt'}{'|tiny' if tiny else ''}"


def project(fits: dict, setup: Setup, *, device: str = "cuda", lora_b: int | None = None) -> dict:
    """Projected peak of `setup` by category. device "cuda": compute and LoRA in bf16 (dynamic bytes x the
    measured bf16/fp32 factor of the fp32 fit); "cpu": as measured (fp32 compute and LoRA)."""
    kind = setup.spec().kind
    f = fits[fit_key(setup.model, setup.checkpointing, setup.tiny)]
    factor = fits.get("_cuda_factor", {}).get(kind, 0.5) if device == "cuda" else 1.0
    lora_b = lora_b or (2 if device == "cuda" else 4)
    compute_b = 2 if device == "cuda" else 4
    store_b = {"fp8": 1, "bf16": 2, "fp32": 4}[setup.store]
    counts = static_counts(setup.model, setup.nd, setup.ns, setup.tiny)
    st = static_bytes(counts, setup.rank, setup.optimizer, store_b, lora_b,
                      data_bytes(setup.model, setup.resolution, setup.text, setup.teacher_text, compute_b, setup.tiny))
    tok = tokens(setup)
    phases = {}
    for phase in (("student", "teacher") if setup.method == "dopsd" else ("sft",)):
        e = f[phase] if phase in f else f["student"]  # a reduced sweep: SFT's step = D-OPSD's student phase
        t = tok["student" if phase == "sft" else phase]
        dyn = sum(c * x for c, x in zip(e["coef"], features(kind, setup.nd, setup.ns, t)))
        cast = e["cast_bytes"] if setup.store != setup.compute and (device == "cpu" or setup.store == "fp8") else 0
        phases[phase] = factor * (dyn + cast)
    top = max(phases, key=phases.get)
    static = {k: v for k, v in st.items() if k != "lora_params"}
    total = sum(static.values()) + phases[top]
    return {"peak_bytes": total, "peak_gib": total / GIB, "static_bytes": static, "phase_bytes": phases,
            "peak_phase": top, "lora_params": st["lora_params"], "tokens": tok}


# --- presets and the projection table -------------------------------------------------------------------
def presets(model: str) -> list[tuple[str, dict]]:
    """(label, TrainConfig changes) of the family's GPU presets, the family default first."""
    spec = spec_named(shapes.SPECS[model].family)
    default = {"rank": spec.rank, "optimizer": "adamw", "checkpointing": False}
    return [(DEFAULT_PRESET, default)] + [(p.label, dict(p.changes)) for p in spec.gpu_presets]


def real_setup(model: str, resolution: int, method: str, preset: dict, store: str) -> Setup:
    """The full-size model at `resolution` with the real text lengths: klein 512 caption tokens (ComfyUI pads
    Flux2 text to 512; the teacher's caption + suffix fits in them), Z-Image a 128-token caption and a
    1184-token Qwen3-VL teacher context (≤ 1024 image tokens + caption + template, rounded to 32)."""
    s = shapes.SPECS[model]
    text, teacher_text = (512, 512) if s.kind == "flux2" else (128, 1184)
    return Setup(model, s.depth, s.depth_single, resolution, text, teacher_text, method=method,
                 checkpointing=preset["checkpointing"], optimizer=preset["optimizer"], rank=preset["rank"],
                 store=store, compute="bf16")


def offload_blocks(model: str, store: str, peak: int, card_gb: int) -> int | None:
    """Blocks whose weights must stay in RAM (largest first) so that the peak fits the card; one block's
    weights are streamed to the GPU at a time (counted). 0 = fits without; None = even all is not enough."""
    usable = (card_gb - CARD_RESERVE_GIB) * GIB
    if peak <= usable:
        return 0
    b = {"fp8": 1, "bf16": 2}[store]
    sizes = sorted((p * b for _, p in static_counts(model).blocks), reverse=True)
    saved = 0
    for n, size in enumerate(sizes, 1):
        saved += size
        if peak - saved + sizes[0] <= usable:
            return n
    return None


def table(fits: dict) -> list[dict]:
    rows = []
    for model in MODELS:
        if fit_key(model, True) not in fits:
            continue  # not measured (yet)
        for label, preset in presets(model):
            if fit_key(model, preset["checkpointing"]) not in fits:  # a reduced sweep: checkpointing only
                rows.extend({"model": model, "title": TITLES[model], "preset": label, "base": store, **preset,
                             "not_projected": "not measured on the CPU without checkpointing (CPU time)"}
                            for store in BASES)
                continue
            for store in BASES:
                row = {"model": model, "title": TITLES[model], "preset": label, "base": store, **preset}
                for res in RESOLUTIONS:
                    for method in ("dopsd", "sft"):
                        pr = project(fits, real_setup(model, res, method, preset, store))
                        row[f"{method}_{res}_gib"] = round(pr["peak_gib"], 2)
                        if res == 1024:
                            row[f"{method}_1024_phase"] = pr["peak_phase"]
                            row[f"{method}_1024_by_category_gib"] = {
                                **{k: round(v / GIB, 3) for k, v in pr["static_bytes"].items()},
                                **{f"dynamic: {k} phase": round(v / GIB, 3) for k, v in pr["phase_bytes"].items()}}
                peak = max(row["dopsd_1024_gib"], row["sft_1024_gib"]) * GIB
                row["fits_gb"] = [c for c in CARDS_GB if peak <= (c - CARD_RESERVE_GIB) * GIB]
                row["dopsd_fits_gb"] = [c for c in CARDS_GB if row["dopsd_1024_gib"] <= c - CARD_RESERVE_GIB]
                row["offload_blocks_12gb"] = offload_blocks(model, store, int(row["dopsd_1024_gib"] * GIB), 12)
                row["dopsd_over_sft_1024"] = round(row["dopsd_1024_gib"] / row["sft_1024_gib"], 3)
                rows.append(row)
    return rows


# --- the sweep ------------------------------------------------------------------------------------------
def POINTS(res):  # 4 points for 4 coefficients; the validation points check what they predict
    return ((1, 1, res[0]), (1, 1, res[1]), (2, 1, res[0]), (1, 2, res[0]))


def POINTS_TINY(res):  # one more: the residual of the fit is tested
    return POINTS(res) + ((2, 2, res[1]),)


def sweep_setups(tiny: bool = False, validation: str = "full", reduced: bool = False) -> tuple[list[Setup], list[Setup]]:
    """The fitted points and the validation points. Per family: 4 depth/resolution points (1+1 blocks at
    two resolutions, 2+1 and 1+2 at the smaller) x 2 methods x checkpointing on (8-bit AdamW) and off
    (AdamW), 64-256 image tokens, K = 1 (memory does not grow with K: per-state backward).
    Validation: 3+3 blocks (klein) / 3 layers + 2 refiner pairs (Z-Image) at 400 image tokens (more
    blocks and tokens than any fitted point; klein-9B: 256), K = 2 (every gradient live from the second
    state on); with checkpointing both methods (klein-9B: D-OPSD), without it D-OPSD on klein-4B (CPU time).
    The tiny mode: one family, checkpointing on, AdamW, a fifth point (2+2 blocks) for a residual.
    `validation` "light": D-OPSD with checkpointing only, at 256 px; "none": no validation points.
    `reduced` (CPU time): checkpointing on and D-OPSD only; SFT is then projected with D-OPSD's
    student-phase fit (the two are equal where both are measured) and the family default is not projected. The tiny mode: one family, checkpointing on, AdamW."""
    fitted, valid = [], []
    res = (64, 128) if tiny else (128, 256)
    vres = 160 if tiny else 320
    for model in (MODELS[:1] if tiny else MODELS):
        kind = shapes.SPECS[model].kind
        text, t_text = (32, 32) if kind == "flux2" else (32, 96)
        for ckpt in ((True,) if tiny or reduced else (True, False)):
            opt = "adamw8bit" if ckpt and not tiny else "adamw"
            for method in ("dopsd",) if reduced else ("dopsd", "sft"):
                for nd, ns, r in POINTS_TINY(res) if tiny else POINTS(res):
                    fitted.append(Setup(model, nd, ns, r, text, t_text, method=method, checkpointing=ckpt,
                                        optimizer=opt, tiny=tiny))
            # CPU time: without checkpointing D-OPSD on klein-4B only; klein-9B D-OPSD at 256 px
            methods = ("dopsd", "sft") if ckpt and model != "klein9b" else ("dopsd",)
            if validation == "light":  # one point: D-OPSD with checkpointing (the presets) at 256 px
                methods = ("dopsd",) if ckpt else ()
            if ckpt or model == "klein4b" or tiny:
                for method in methods if validation != "none" else ():
                    valid.append(Setup(model, 3, 3 if kind == "flux2" else 2,
                                       256 if (model == "klein9b" or validation == "light") and not tiny else vres, text, t_text, method=method, checkpointing=ckpt, optimizer=opt,
                                       k=2, tiny=tiny))
    return fitted, valid


def validate(fits: dict, measured: list[dict]) -> list[dict]:
    out = []
    for m in measured:
        s = Setup(**m["setup"])
        pr = project(fits, s, device="cpu")
        static = sum(m["peak_by_category"][c] for c in STATIC)
        dyn_meas = m["peak_bytes"] - static
        dyn_proj = pr["peak_bytes"] - sum(pr["static_bytes"][c] for c in STATIC)
        out.append({"setup": m["setup"], "measured_peak_bytes": m["peak_bytes"], "projected_peak_bytes": int(pr["peak_bytes"]),
                    "error_pct": round(100 * (pr["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"], 2),
                    "measured_dynamic_bytes": dyn_meas, "projected_dynamic_bytes": int(dyn_proj),
                    "dynamic_error_pct": round(100 * (dyn_proj - dyn_meas) / dyn_meas, 2),
                    "static_measured_bytes": static,
                    "static_computed_bytes": int(sum(pr["static_bytes"][c] for c in STATIC))})
    return out


def static_check(measured: list[dict]) -> dict:
    """The computed static bytes against the tracker's, per fitted point: max relative error per category."""
    worst = dict.fromkeys(("base weights", "LoRA (student)", "EMA teacher LoRA", "optimizer state", "data"), 0.0)
    for m in measured:
        s = Setup(**m["setup"])
        counts = static_counts(s.model, s.nd, s.ns, s.tiny)
        st = static_bytes(counts, s.rank, s.optimizer, {"fp8": 1, "bf16": 2, "fp32": 4}[s.store], 4,
                          data_bytes(s.model, s.resolution, s.text, s.teacher_text, 4, s.tiny))
        for c in worst:
            meas = m["peak_by_category"][c]
            worst[c] = max(worst[c], abs(st[c] - meas) / max(meas, 1))
    return {c: round(v, 6) for c, v in worst.items()}


def dtype_check(tiny: bool) -> dict:
    """The fp32 -> bf16 factor of dynamic bytes, measured at reduced width (hidden 512: bf16 matmuls are
    slow on this CPU): the same setup with base and compute in bf16 and in fp32 (no casts); and the fp8
    base's path (fp8 stored, fp32 compute) against the plain fp32 one, casts taken out (`fp8_vs_plain`)."""
    out = {}
    for model in ("klein4b", "zimage"):
        base = TINY_SPECS[model] if tiny else replace(shapes.SPECS[model], hidden=512, heads=4, mlp_hidden=1536,
                                                      context_dim=512)
        TINY_SPECS["_check"] = base
        res = {}
        try:
            for dt in ("fp32", "bf16", "fp8"):
                s = Setup("_check", 1, 1, 128, 32, 32 if base.kind == "flux2" else 96, store=dt,
                          compute="fp32" if dt == "fp8" else dt, optimizer="adamw", tiny=True)
                m = measure(s)
                res[dt] = {ph: m["phase_peak_bytes"][ph] - m["phase_by_category"][ph]["base weight casts"]
                           for ph in ("student", "teacher")}
        finally:
            TINY_SPECS.pop("_check")
        out[model] = {**res, "ratio": {ph: round(res["bf16"][ph] / res["fp32"][ph], 4) for ph in ("student", "teacher")},
                      "fp8_vs_plain": {ph: round(res["fp8"][ph] / res["fp32"][ph], 4) for ph in ("student", "teacher")}}
    return out


def cuda_factor(dcheck: dict | None) -> dict:
    """bf16 bytes per fp32 byte of the dynamic memory, per model kind: the larger of the two phases' ratios
    the dtype check measured (hidden 512), at least 0.5. On the safe side: at full width the fp32-only
    tensors (norm statistics, attention log-sum-exp) weigh less, and the CPU's rms_norm saves an fp32 copy
    of its bf16 input, which CUDA's fused kernel does not (Z-Image's blocks use six)."""
    kinds = {"klein4b": "flux2", "zimage": "nextdit"}
    if not dcheck:
        return {k: 0.5 for k in kinds.values()}
    return {kinds[m]: max(0.5, max(d["ratio"].values())) for m, d in dcheck.items()}


def versions() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "threads": torch.get_num_threads()}


def compact(m: dict) -> dict:
    """A measured point as stored: bytes as ints, categories that are zero left out."""
    def nz(d):
        return {k: int(v) for k, v in d.items() if v}
    return {**m, "peak_by_category": nz(m["peak_by_category"]),
            "phase_by_category": {ph: nz(d) for ph, d in m["phase_by_category"].items()}}


def expand(m: dict) -> dict:
    def full(d):
        return {c: d.get(c, 0) for c in CATEGORIES}
    return {**m, "peak_by_category": full(m["peak_by_category"]),
            "phase_by_category": {ph: full(d) for ph, d in m["phase_by_category"].items()}}


def summarize(fitted: list[dict], valid: list[dict], dcheck: dict, tiny: bool, wall: float) -> dict:
    fitted = [expand(m) for m in fitted]
    valid = [expand(m) for m in valid]
    fits = fit(fitted)
    fits["_cuda_factor"] = cuda_factor(dcheck)
    val = validate(fits, valid)
    report = {
        "what": "peak tensor bytes of one training step by category (bench/memory.py); measured on the CPU, "
                "projected to CUDA",
        "measured": "CPU, stand-ins of bench/shapes.py at full width and reduced depth, base stored fp8 and "
                    "computed fp32, LoRA fp32; tracker of tensor bytes (MemoryTracker)",
        "computed": "static bytes from shapes (meta device); CUDA dynamic bytes = fit['_cuda_factor'] x the fp32 "
                    "fit (bf16; the factor from dtype_check); "
                    f"fits a card if the peak <= card - {CARD_RESERVE_GIB} GiB (CUDA context, allocator slack)",
        "versions": versions(), "tiny": tiny, "run_seconds": round(wall, 1),
        "fit": fits, "validation": val,
        "validation_max_abs_error_pct": max(abs(v["error_pct"]) for v in val) if val else None,
        "static_check_max_rel_error": static_check(fitted),
        "dtype_check": dcheck,
        "points": [compact(m) for m in fitted], "validation_points": [compact(m) for m in valid],
    }
    report["card_reserve_gib"] = CARD_RESERVE_GIB
    if not tiny:
        report["blocks"] = {m: len(static_counts(m).blocks) for m in MODELS}
        report["projection"] = table(fits)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tiny", action="store_true", help="tiny dims, one family (the CI test)")
    p.add_argument("--validation", choices=["full", "light", "none"], default="full",
                   help="validation points: full (see sweep_setups), light (D-OPSD with checkpointing), none")
    p.add_argument("--reduced", action="store_true", help="checkpointing on and D-OPSD only (CPU time)")
    p.add_argument("--project-only", action="store_true", help="re-fit and re-project from --out's measured points")
    p.add_argument("--only", default="", help="comma-separated models to measure (the others' points are kept "
                   "from --out); add 'dtype' to re-run the dtype check")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.project_only:
        old = json.loads(args.out.read_text())
        report = summarize(old["points"], old["validation_points"], old["dtype_check"], old["tiny"], old["run_seconds"])
    else:
        fitted_s, valid_s = sweep_setups(args.tiny, args.validation, args.reduced)
        keep_f, keep_v, old = [], [], {}
        if args.only:
            only = set(args.only.split(","))
            old = json.loads(args.out.read_text()) if args.out.is_file() else {"points": [], "validation_points": []}
            keep_f = [m for m in old["points"] if m["setup"]["model"] not in only]
            keep_v = [m for m in old["validation_points"] if m["setup"]["model"] not in only]
            fitted_s = [s for s in fitted_s if s.model in only]
            valid_s = [s for s in valid_s if s.model in only]
        fitted, valid = [], []
        for i, s in enumerate(fitted_s + valid_s):
            m = measure(s)
            (fitted if i < len(fitted_s) else valid).append(m)
            print(f"[{time.perf_counter() - t0:7.1f}s] {s.model} {s.nd}+{s.ns} {s.resolution}px {s.method} "
                  f"ckpt={s.checkpointing} k={s.k}: peak {m['peak_bytes'] / 2**20:.1f} MiB "
                  f"(student {m['phase_peak_bytes']['student'] / 2**20:.1f}, teacher "
                  f"{m['phase_peak_bytes']['teacher'] / 2**20:.1f}) {m['seconds']}s", file=sys.stderr, flush=True)
        if args.tiny:
            dcheck = None  # at tiny widths fp32-only tensors weigh too much for the factor to mean anything
        elif args.only and "dtype" not in args.only.split(",") and old.get("dtype_check"):
            dcheck = old["dtype_check"]
        else:
            dcheck = dtype_check(False)
        report = summarize(keep_f + [compact(m) for m in fitted], keep_v + [compact(m) for m in valid], dcheck,
                           args.tiny, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"out": str(args.out), "validation_max_abs_error_pct": report["validation_max_abs_error_pct"],
                      "run_seconds": report["run_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

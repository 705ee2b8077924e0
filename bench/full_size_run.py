"""`bench/full_size.py run`: the user's path through full-size random-weight files on the real ComfyUI (CPU).

Starts ComfyUI (COMFYUI_PATH) with --cpu on the folder `write` filled (its models/ and a fresh input/,
output/, custom_nodes/ with links to this pack and to bench/full_size_nodes), and queues over the HTTP
API what a user queues, one prompt after another (unchanged loader and dataset nodes are served from
ComfyUI's cache, as in the UI; with --cache-none, which the run uses, every prompt loads again and
outputs are freed as soon as their last consumer ran):

1. the stock loaders (UNETLoader with the asked weight_dtype, CLIPLoader type flux2 / lumina2,
   VAELoader; DOPSDQwen3VLLoader for Z-Image) -> DOPSDFullSizeInfo: what ComfyUI detected, parameter
   counts and dtypes, against the published counts;
2. DOPSDDataset on 1-2 small generated images -> DOPSDFullSizeInfo: context and latent shapes;
3. per GPU preset: DOPSDTrainer (few D-OPSD steps) and DOPSDSFTTrainer (few SFT steps) -> DOPSDSaveLoRA;
   a preset that cannot run here (8-bit AdamW without bitsandbytes) is logged with its error, then run
   with everything else it changes (rank, alpha = rank, checkpointing) and AdamW;
4. right after the first LoRA is saved: it goes through the stock LoraLoaderModelOnly, sampled beside
   the base model (stock sampler, 1 step, same seed): the outputs must differ.

The trainers' pre-flight teacher check (node input teacher_check, default warn: a few-step teacher and
student sampling before step 1) is off unless --teacher-check asks for it: at full size on the CPU it
costs about eight forwards, more than a step.

Step times come from ComfyUI's own progress messages (websocket), memory from the server process's RSS
(sampled every 0.5 s; peak per prompt) -- RSS, not a tensor tracker: what the machine had to hold.
Everything goes to the log (docs/logs/full_size_<family>.txt by default), which is flushed line by line.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import full_size as fs

REPO = fs.REPO
sys.path.insert(0, str(REPO / "tests"))
from comfyui.hostutil import Comfy, _free_port, graph, node_error_text  # noqa: E402

PRESETS = ("family default", "12 GB (rank 16, 8-bit AdamW, checkpointing)",
           "16-24 GB (rank 32, 8-bit AdamW, checkpointing)")
CAPTION = "a photo of [V]"


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.t0 = time.time()

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        for ln in line.splitlines() or [""]:
            self.f.write(f"[{stamp} +{time.time() - self.t0:7.0f}s] {ln}\n")
            print(f"[{stamp}] {ln}", flush=True)
        self.f.flush()


class RssSampler(threading.Thread):
    """Resident set size of a process every `every` s; peak since the last reset()."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, False

    @staticmethod
    def rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.rss(self.pid))
            time.sleep(self.every)

    def reset(self) -> int:
        p, self.peak = self.peak, self.rss(self.pid)
        return p


class Progress(threading.Thread):
    """ComfyUI's websocket messages (progress per node, executing, errors) with arrival times."""

    def __init__(self, url: str, client_id: str):
        super().__init__(daemon=True)
        self.url, self.client_id, self.events = url, client_id, []

    def run(self) -> None:
        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}",
                                        heartbeat=30, max_msg_size=0) as ws:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            try:
                                self.events.append((time.time(), json.loads(msg.data)))
                            except ValueError:
                                pass
        while True:
            try:
                asyncio.run(listen())
            except Exception:  # noqa: BLE001 - reconnect
                time.sleep(1)

    def step_times(self, since: float, node: str) -> list[float]:
        """Seconds from the node's start to its first progress update (setup + step 1), then between
        successive updates (one per optimizer step)."""
        start = [t for t, e in self.events if t >= since and e.get("type") == "executing"
                 and str(e.get("data", {}).get("node")) == node]
        ts = start[:1] + [t for t, e in self.events if t >= since and e.get("type") == "progress"
                          and str(e.get("data", {}).get("node")) == node]
        return [round(b - a, 1) for a, b in zip(ts, ts[1:])]


class Server:
    def __init__(self, base: Path, extra_args: list[str], log: Log):
        self.base, self.log = base, log
        comfyui = fs.comfyui_path()
        port = _free_port()
        self.server_log = base / "comfyui.log"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *extra_args]
        log("server:", " ".join(cmd))
        env = dict(os.environ)
        if (base / "pylib").is_dir():  # e.g. bitsandbytes installed for this run only
            env["PYTHONPATH"] = f"{base / 'pylib'}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self.proc = subprocess.Popen(cmd, cwd=comfyui, stdout=open(self.server_log, "w"), stderr=subprocess.STDOUT,
                                     env=env)
        self.comfy = Comfy(base, port, self.proc, self.server_log)
        deadline = time.time() + 900
        while True:
            try:
                self.comfy.get("/system_stats")
                break
            except Exception:  # noqa: BLE001
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{self.server_log.read_text()[-3000:]}")
                time.sleep(1)
        self.client_id = f"dopsd-full-size-{uuid.uuid4().hex[:6]}"
        self.rss = RssSampler(self.proc.pid)
        self.rss.start()
        self.progress = Progress(self.comfy.url, self.client_id)
        self.progress.start()
        self.log_pos = 0

    def new_server_lines(self) -> list[str]:
        text = self.server_log.read_text(errors="replace")
        new, self.log_pos = text[self.log_pos:], len(text)
        return [ln for ln in new.splitlines() if ln.strip()]

    def run(self, nodes: list, label: str, timeout: float) -> tuple[dict | None, float, int]:
        """Queue one prompt; log its outcome, wall time, peak RSS and the server's log lines."""
        self.rss.reset()
        t0 = time.time()
        status, body = self.comfy.post("/prompt", {"prompt": graph(*nodes), "client_id": self.client_id})
        if status != 200:
            self.log(f"[{label}] refused by the server: {json.dumps(body)[:2000]}")
            return None, 0.0, 0
        entry = self.comfy.wait(body["prompt_id"], timeout=timeout)
        dt, peak = time.time() - t0, self.rss.reset()
        ok = entry["status"]["status_str"] == "success"
        for ln in self.new_server_lines():
            self.log(f"    comfyui| {ln}")
        self.log(f"[{label}] {'success' if ok else 'ERROR'} in {dt:.1f} s, peak RSS of the server "
                 f"{peak / 2**30:.2f} GiB" + ("" if ok else f": {node_error_text(entry)}"))
        return entry, dt, peak

    def close(self) -> None:
        self.rss.stop = True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _write_images(folder: Path, n: int, res: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg, fg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        im = Image.new("RGB", (res, res), bg)
        r = res // 4
        ImageDraw.Draw(im).ellipse((res // 2 - r, res // 2 - r, res // 2 + r, res // 2 + r), fill=fg)
        im.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(CAPTION + "\n")


def _infos(entry: dict | None) -> list[dict]:
    out = []
    for node_out in (entry or {}).get("outputs", {}).values():
        for text in node_out.get("text", []):
            try:
                out.append(json.loads(text))
            except (TypeError, ValueError):
                pass
    return out


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src, target_is_directory=True)


def run(a) -> int:
    family = a.family
    base = a.out.resolve()
    models = base / "models"
    klein = family.startswith("klein")
    tag = family if a.weight_dtype == "default" else f"{family}_{a.weight_dtype.replace('-', '_')}"
    log = Log(a.log or REPO / "docs" / "logs" / f"full_size_{tag}.txt")
    log("=" * 100)
    log(f"bench/full_size.py run --family {family} --weight-dtype {a.weight_dtype} --resolution {a.resolution} "
        f"--images {a.images} --dopsd-steps {a.dopsd_steps} --sft-steps {a.sft_steps} --k {a.k} --states {a.states}")
    log(f"host: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM; "
        f"python {sys.version.split()[0]}; ComfyUI {fs.comfyui_path()}")
    files = {t: (sub, name) for sub, name, t in fs.FAMILY_FILES[family]}
    dit_table = {"klein-4b": "klein-4b", "klein-9b": "klein-9b", "z-image": "z-image"}[family]
    if a.weight_dtype == "fp8-file":
        dit_table += "-fp8"
    dit_file = files[dit_table][1]
    te_table = "qwen3-8b" if family == "klein-9b" else "qwen3-4b"
    vae_table = "flux2-vae" if klein else "flux1-vae"
    for t in (dit_table, te_table, vae_table) + (() if klein else ("qwen3-vl",)):
        p = models / files[t][0] / files[t][1]
        if not p.exists():
            log(f"missing {p}: run `bench/full_size.py write --family {family} --out {a.out}` first")
            return 2
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir())
        log(f"file {p.relative_to(base)}: {size:,} B; table {t}: {fs.n_params(fs.components()[t]):,} parameters")
    for sub in ("input", "output", "user", "custom_nodes", "models/loras"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(REPO, base / "custom_nodes" / "ComfyUI-D-OPSD")
    _link(Path(__file__).parent / "full_size_nodes", base / "custom_nodes" / "dopsd_full_size_nodes")
    # On the CPU ComfyUI stores a default-dtype DiT in fp32 (bf16 compute is slow there: should_use_bf16 is
    # False for the CPU), which doubles its RAM. --bf16-unet keeps the bf16 storage a CUDA user gets; the
    # compute is fp32 by ComfyUI's manual cast, layer by layer, exactly as for an fp8 base.
    # --cache-none (a stock option for low-RAM machines): ComfyUI keeps no node outputs between prompts and
    # frees each within a prompt once its last consumer ran, so the text encoder is freed after DOPSDDataset
    # (the dataset itself is cached on disk by the pack) instead of sitting beside the DiT while it trains.
    extra = ["--bf16-unet", "--cache-none"]
    if a.fp8_text_encoder:
        extra.append("--fp8_e4m3fn-text-enc")
    server = Server(base, extra, log)
    data_name = f"full_size_data_{a.resolution}"
    _write_images(base / "input" / data_name, a.images, max(a.resolution, 64))
    failures = []
    try:
        return _run(a, server, log, family, klein, dit_file, files, te_table, dit_table, vae_table, data_name,
                    failures)
    except Exception:  # noqa: BLE001 - the log keeps whatever broke
        log("FAILED with an exception in the bench driver:\n" + traceback.format_exc())
        failures.append("bench driver: " + traceback.format_exc().strip().splitlines()[-1])
        return 1
    finally:
        for ln in server.new_server_lines():
            log(f"    comfyui| {ln}")
        server.close()
        log(f"summary: {len(failures)} failure(s): {failures}")


def _run(a, server, log, family, klein, dit_file, files, te_table, dit_table, vae_table, data_name, failures):
    comps = fs.components()
    weight_dtype = "default" if a.weight_dtype == "fp8-file" else a.weight_dtype
    loaders = [(1, "UNETLoader", {"unet_name": dit_file, "weight_dtype": weight_dtype}),
               (2, "CLIPLoader", {"clip_name": files[te_table][1], "type": "flux2" if klein else "lumina2",
                                  "device": "default"}),
               (3, "VAELoader", {"vae_name": files[vae_table][1]})]
    if not klein:
        loaders.append((4, "DOPSDQwen3VLLoader", {"vlm_folder": fs.VL_FOLDER,
                                                  "text_encoder": "(the clip input of D-OPSD Dataset)",
                                                  "dtype": a.vlm_dtype}))
    # 1. loaders
    entry, _, _ = server.run(loaders + [(90, "DOPSDFullSizeInfo", {"label": "loaders", "model": ["1", 0],
                                                                   "clip": ["2", 0], "vae": ["3", 0]})],
                             "load", a.timeout)
    info = next(iter(_infos(entry)), None)
    if info is None:
        failures.append("load")
        return 1
    log("loaded:", json.dumps(info, indent=1))
    published = {"klein-4b": "klein-4b", "klein-9b": "klein-9b", "z-image": "z-image"}[family]
    checks = [("diffusion model", info["model"]["parameters"], fs.PUBLISHED[published]),
              ("text encoder (less ComfyUI's own logit_scale)",
               info["clip"]["parameters"] - info["clip"].get("comfyui_own_logit_scale", 0), fs.PUBLISHED[te_table]),
              ("vae", info["vae"]["parameters"] + info["vae"]["buffers"] - _bn_tracked(info),
               fs.PUBLISHED[vae_table])]
    for what, got, want in checks:
        ok = got == want
        log(f"count {what}: loaded {got:,} vs published {want:,}: {'OK' if ok else 'DIFFERENT'}")
        if not ok:
            failures.append(f"count {what}")
    if a.stop_after == "load":
        return 0 if not failures else 1
    # 2. dataset
    ds_inputs = {"model": ["1", 0], "folder": data_name, "caption_template": CAPTION, "resolution": a.resolution,
                 "aspect_buckets": False, "clip": ["2", 0], "vae": ["3", 0], "prior_prompts": a.prior_prompts}
    if not klein:
        ds_inputs["vlm"] = ["4", 0]
    dataset = (5, "DOPSDDataset", ds_inputs)
    entry, dt, _ = server.run(loaders + [dataset, (91, "DOPSDFullSizeInfo", {"label": "dataset", "dataset": ["5", 0]})],
                              "dataset (DOPSDDataset)", a.timeout)
    if entry is None or entry["status"]["status_str"] != "success":
        failures.append("dataset")
        return 1
    log("dataset:", json.dumps(next(iter(_infos(entry)), {}), indent=1))
    log("dataset cache file:", _dataset_info(server.base))
    if a.stop_after == "dataset":
        return 0 if not failures else 1
    # 3. trainers
    order = [int(i) for i in a.presets.split(",")] if a.presets != "all" else range(len(PRESETS))
    presets = [PRESETS[i] for i in order]
    saved = []
    for preset in presets:
        for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
            steps = a.dopsd_steps if method == "dopsd" else a.sft_steps
            if steps <= 0:
                continue
            tag = f"{'p' + str(PRESETS.index(preset))}_{method}"
            ok, lora = _train(a, server, log, loaders, dataset, preset, method, steps, tag, {})
            if not ok and "bitsandbytes" in ok_reason(server):
                log(f"[{tag}] the preset asks for 8-bit AdamW and bitsandbytes is not importable here: running "
                    "it again with everything else the preset changes (its rank, alpha = rank, checkpointing) "
                    "and AdamW")
                changes = _preset_changes(family, preset)
                ok, lora = _train(a, server, log, loaders, dataset, "family default", method, steps, tag + "_adamw",
                                  {"rank": changes.get("rank", 0), "checkpointing": changes.get("checkpointing", False)})
                failures.append(f"{tag}: 8-bit AdamW (bitsandbytes missing)")
            if not ok:
                failures.append(tag)
            elif lora:
                saved.append(lora)
                if len(saved) == 1:  # 4. the first saved LoRA through the stock LoraLoaderModelOnly
                    _check_lora(a, server, log, loaders, klein, saved[0], failures)
    return 0 if not failures else 1


_LAST_ERROR = {"text": ""}


def ok_reason(server) -> str:
    return _LAST_ERROR["text"]


def _bn_tracked(info: dict) -> int:
    """BatchNorm's num_batches_tracked buffer (1 element) is not in the file's count."""
    return 1 if info["vae"]["buffers"] == 257 else 0


def _preset_changes(family: str, preset: str) -> dict:
    sys.path.insert(0, str(REPO))
    from dopsd_core.family_spec import spec_named
    return spec_named("flux2-klein" if family.startswith("klein") else "z-image").preset(preset)


def _train(a, server, log, loaders, dataset, preset, method, steps, tag, overrides):
    run_name = f"fs_{tag}_{uuid.uuid4().hex[:4]}"
    inputs = {"model": ["1", 0], "dataset": ["5", 0], "steps": steps, "gpu_preset": preset,
              "rank": overrides.get("rank", 0), "lr": 0.0, "optimizer": "adamw", "batch_size": 1, "grad_accum": 1,
              "seed": 0, "checkpointing": overrides.get("checkpointing", False), "save_every": 0, "preview_every": 0,
              "run_name": run_name, "resume": False, "teacher_check": a.teacher_check}
    if method == "dopsd":
        inputs.update(k=a.k, teacher="ema", ema_decay=0.9999, loss_weight="x0", states=a.states)
        node = "DOPSDTrainer"
    else:
        node = "DOPSDSFTTrainer"
    lora_name = f"dopsd/full_size_{tag}_{uuid.uuid4().hex[:4]}"
    nodes = loaders + [dataset, (6, node, inputs),
                       (7, "DOPSDSaveLoRA", {"lora": ["6", 1], "name": lora_name, "overwrite": True})]
    log(f"[{tag}] {node} gpu_preset={preset!r} steps={steps} overrides={overrides}")
    t0 = time.time()
    entry, dt, peak = server.run(nodes, f"{tag} {node}", a.timeout)
    ok = entry is not None and entry["status"]["status_str"] == "success"
    _LAST_ERROR["text"] = "" if ok else (node_error_text(entry) if entry else "refused")
    times = server.progress.step_times(t0, "6")
    state = server.base / "output" / "dopsd" / run_name / "state" / "state.json"
    if state.is_file():
        st = json.loads(state.read_text())
        log(f"[{tag}] run folder: step {st.get('step')}, losses {st.get('history')}, config "
            f"{ {k: st.get('config', {}).get(k) for k in ('rank', 'alpha', 'optimizer', 'checkpointing', 'k', 'states', 'batch_size', 'grad_accum')} }")
    log(f"[{tag}] step times from ComfyUI's progress messages: {times} s (the first includes the trainer's "
        f"setup: weights made trainable, LoRA attached); prompt {dt:.0f} s for {steps} steps")
    lora_file = server.base / "models" / "loras" / f"{lora_name}.safetensors"
    if ok and lora_file.is_file():
        log(f"[{tag}] saved {lora_file.relative_to(server.base)} ({lora_file.stat().st_size:,} B)")
        return True, f"{lora_name}.safetensors"
    return ok, None


def _dataset_info(base: Path) -> str:
    """Shapes in the newest dataset cache file (what the trainers read)."""
    files = sorted((base / "output" / "dopsd" / "cache").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not files:
        return "no cache file"
    from safetensors import safe_open
    with safe_open(str(files[-1]), "pt") as f:
        return "; ".join(f"{k} {list(f.get_slice(k).get_shape())} {f.get_slice(k).get_dtype()}" for k in sorted(f.keys()))


def _check_lora(a, server, log, loaders, klein, lora_name, failures):
    """A 1-step stock sample of the base and of the base + LoRA (LoraLoaderModelOnly), same seed, in two
    prompts: with --cache-none each prompt frees what it loaded, so the base, its LoRA-patched copy and the
    text encoder are never resident together (klein-9B's three did not fit 24 GB of RAM in one prompt)."""
    res = max(a.resolution, 64)
    text = (20, "CLIPTextEncode", {"clip": ["2", 0], "text": CAPTION})
    prefix = f"full_size_{uuid.uuid4().hex[:6]}"
    for nid, name in ((40, "base"), (50, "lora")):
        nodes = loaders + [text]
        model = ["1", 0]
        if name == "lora":
            nodes.append((30, "LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}))
            model = ["30", 0]
        if klein:
            nodes += [(nid, "RandomNoise", {"noise_seed": 7}),
                      (nid + 1, "KSamplerSelect", {"sampler_name": "euler"}),
                      (nid + 2, "Flux2Scheduler", {"steps": 1, "width": res, "height": res}),
                      (nid + 3, "EmptyFlux2LatentImage", {"width": res, "height": res, "batch_size": 1}),
                      (nid + 4, "BasicGuider", {"model": model, "conditioning": ["20", 0]}),
                      (nid + 5, "SamplerCustomAdvanced", {"noise": [str(nid), 0], "guider": [str(nid + 4), 0],
                                                          "sampler": [str(nid + 1), 0], "sigmas": [str(nid + 2), 0],
                                                          "latent_image": [str(nid + 3), 0]})]
        else:
            nodes += [(nid + 3, "EmptySD3LatentImage", {"width": res, "height": res, "batch_size": 1}),
                      (nid + 5, "KSampler", {"model": model, "seed": 7, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                             "scheduler": "simple", "positive": ["20", 0], "negative": ["20", 0],
                                             "latent_image": [str(nid + 3), 0], "denoise": 1.0})]
        nodes.append((nid + 6, "SaveLatent", {"samples": [str(nid + 5), 0], "filename_prefix": f"latents/{prefix}_{name}"}))
        label = f"LoraLoaderModelOnly({lora_name}), 1-step sample" if name == "lora" else "the base, 1-step sample"
        entry, dt, _ = server.run(nodes, label, a.timeout)
        if entry is None or entry["status"]["status_str"] != "success":
            failures.append(f"lora check ({name})")
            return
    from safetensors.torch import load_file
    out = {}
    for name in ("base", "lora"):
        f = sorted((server.base / "output" / "latents").glob(f"{prefix}_{name}_*.latent"))[-1]
        out[name] = load_file(str(f))["latent_tensor"].float()
    diff = (out["base"] - out["lora"]).abs().max().item()
    finite = all(bool(t.isfinite().all()) for t in out.values())
    log(f"LoRA check: stock LoraLoaderModelOnly({lora_name}) vs the base model, same seed, 1 step: "
        f"max |diff| {diff:.3g} (finite: {finite}; base latent std {out['base'].std():.3g})")
    if not (diff > 0 and finite):
        failures.append("lora check: the LoRA did not change the output")

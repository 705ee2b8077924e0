"""`bench/full_size.py cli`: the headless CLI (`dopsd train` / `dopsd sample`, ComfyUI as a library) on the
full-size random-weight files `write` made: the stock loaders' calls on real-size files, the checks that
the files belong together, a D-OPSD step and a LoRA sample. One process per command, its peak RSS
sampled; everything goes to docs/logs/full_size_cli_<family>.txt.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import full_size as fs
from full_size_run import Log, _write_images

REPO = fs.REPO


def _run(cmd: list[str], log: Log, label: str, timeout: float) -> int:
    """Run one command, log its output line by line (a reader thread) and its peak RSS (sampled)."""
    import threading
    log(f"[{label}] $ {' '.join(cmd)}")
    t0, peak = time.time(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def read():
        for ln in proc.stdout:
            if "Loading weights" not in ln:  # transformers' progress bar, one line per shard tensor
                log(f"    {label}| {ln.rstrip()}")
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) * 1024)
        except (OSError, StopIteration):
            pass
        if time.time() - t0 > timeout:
            proc.kill()
            log(f"[{label}] killed after {timeout:.0f} s")
        time.sleep(0.5)
    reader.join(timeout=10)
    log(f"[{label}] exit {proc.returncode} in {time.time() - t0:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    return proc.returncode


def cli(a) -> int:
    family = a.family
    base = a.out.resolve()
    files = {t: base / "models" / sub / name for sub, name, t in fs.FAMILY_FILES[family]}
    klein = family.startswith("klein")
    dit = files[{"klein-4b": "klein-4b", "klein-9b": "klein-9b-fp8", "z-image": "z-image"}[family]]
    te = files["qwen3-8b" if family == "klein-9b" else "qwen3-4b"]
    vae = files["flux2-vae" if klein else "flux1-vae"]
    log = Log(a.log or REPO / "docs" / "logs" / f"full_size_cli_{family}.txt")
    log("=" * 100)
    log(f"bench/full_size.py cli --family {family} --resolution {a.resolution} --steps {a.steps}; "
        f"host: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM")
    missing = [p for p in (dit, te, vae) if not p.exists()]
    if missing:
        log(f"missing {missing}: run `bench/full_size.py write --family {family} --out {a.out}` first")
        return 2
    data = base / "cli_data"
    _write_images(data, 1, max(a.resolution, 64))
    run_dir = base / "cli_runs" / f"{family}_{int(time.time())}"
    model = "flux2-klein" if klein else "z-image"
    files_args = ["--model", model, "--comfyui", str(fs.comfyui_path()), "--diffusion-model", str(dit),
                  "--text-encoder", str(te), "--vae", str(vae)]
    if a.weight_dtype != "default":
        files_args += ["--weight-dtype", a.weight_dtype]
    if a.text_encoder_dtype != "default":
        files_args += ["--text-encoder-dtype", a.text_encoder_dtype]
    if not klein:
        files_args += ["--vlm", str(files["qwen3-vl"]), "--vlm-dtype", a.vlm_dtype]
    py = [sys.executable, "-m", "dopsd_core"]
    failures = []
    rc = _run(py + ["train", *files_args, "--data", str(data), "--out", str(run_dir), "--steps", str(a.steps),
                    "--resolution", str(a.resolution), "--k", "2", "--states", "one", "--gpu-preset", "12gb",
                    "--optimizer", "adamw", "--prior-prompts", "none", "--teacher-check", "off"],
              log, "train", a.timeout)
    if rc != 0 or not (run_dir / "lora.safetensors").is_file():
        failures.append("train")
    else:
        log(f"[train] {run_dir / 'lora.safetensors'}: {(run_dir / 'lora.safetensors').stat().st_size:,} B; "
            f"comfyui.json: {(run_dir / 'comfyui.json').read_text().strip()}")
        rc = _run(py + ["sample", *files_args,
                        "--lora", str(run_dir / "lora.safetensors"), "--prompt", "a photo of [V]", "--n", "1",
                        "--width", str(a.resolution), "--height", str(a.resolution), "--out", str(run_dir / "samples")],
                  log, "sample", a.timeout)
        if rc != 0 or not (run_dir / "samples" / "sample_000.png").is_file():
            failures.append("sample")
    log(f"summary: {len(failures)} failure(s): {failures}")
    return 0 if not failures else 1

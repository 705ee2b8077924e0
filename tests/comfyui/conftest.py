"""Host tier: real ComfyUI (COMFYUI_PATH) started as a server on loopback, graphs queued over HTTP.

Run with ComfyUI's own venv python after `pip install -e .` into it:
    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui
Without COMFYUI_PATH every test here is skipped with that reason. With it, a skipped test fails the
run (.ci/host-tier runs this tier in CI; nothing may silently drop out): DOPSD_ALLOW_SKIP=1 relaxes that
for a local run without, say, Chromium.

The server gets its own --base-directory (a temp folder whose custom_nodes/ holds one link to this
checkout), so the pack is loaded exactly once whether or not it is also linked into the ComfyUI
checkout, and nothing is written into the ComfyUI checkout. A second link there loads the test-only
node pack tests/comfyui/testing_nodes (tiny Z-Image MODEL, tiny Qwen3 CLIPs, tiny Flux VAEs), and
models/diffusion_models/ gets tiny FLUX.2-klein and FLUX.1 DiTs in the released key layout, which the
stock UNETLoader recognises at that size.

The server runs with OMP_NUM_THREADS=1 unless the environment sets it: the host tier's models are
tiny, and on a busy machine (niced tests next to other jobs) torch's intra-op thread pool waits on
its barriers for CPU time at every op, which made a tiny text encoder ~20x slower than one thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui.hostutil import Comfy, _free_port
from comfyui.testing_nodes import tiny_models

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def _import_comfy() -> None:
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401


@pytest.fixture(scope="module")
def comfy_lib():
    """ComfyUI's modules importable in this process (for tests that build models from its classes)."""
    if not COMFYUI_PATH:
        pytest.skip("host tier: COMFYUI_PATH is not set")
    _import_comfy()
    return True


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    reason = "host tier: set COMFYUI_PATH to a ComfyUI 0.18.1 checkout to run these tests"
    print(f"\n[skipped] {reason}")
    for item in items:
        if "tests/comfyui" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionfinish(session, exitstatus):
    if not COMFYUI_PATH or os.environ.get("DOPSD_ALLOW_SKIP") == "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        print(f"\nhost tier: {len(skipped)} test(s) skipped with COMFYUI_PATH set; that fails the run "
              "(set DOPSD_ALLOW_SKIP=1 to allow it locally)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if not COMFYUI_PATH:
        pytest.skip("host tier: COMFYUI_PATH is not set")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-D-OPSD").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "dopsd_testing_nodes").symlink_to(Path(__file__).parent / "testing_nodes",
                                                               target_is_directory=True)
    for sub in ("input", "output", "models/loras", "models/diffusion_models", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _import_comfy()  # the DiT files are written from ComfyUI's own model classes
    dm_dir = base / "models" / "diffusion_models"
    tiny_models.write_dit(tiny_models.tiny_klein(), dm_dir / tiny_models.KLEIN_FILE)
    tiny_models.write_dit(tiny_models.tiny_flux1(), dm_dir / tiny_models.FLUX1_FILE)
    port = _free_port()
    log = base / "comfyui.log"
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=COMFYUI_PATH, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    server = Comfy(base, port, proc, log)
    deadline = time.time() + float(os.environ.get("COMFYUI_START_TIMEOUT", "420"))  # slow on a busy 2-core box
    while True:
        try:
            server.get("/system_stats")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"ComfyUI did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()



"""Packaging traps (docs/architecture.md): CI runs the README's test command and then the host tier; the
root __init__.py is inert outside ComfyUI; declared dependencies and the console script; the lab
(experiments/) stays out of the package and the wheel (tests/test_imports.py: the package never imports it)."""
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    all_blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert "custom_nodes" in all_blocks[0] and "requirements.txt" in all_blocks[0], \
        "the README's first code block installs the pack into ComfyUI"
    try_out = readme.split("## Try it on a CPU")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", try_out, re.S)
    assert len(blocks) == 2, "the CPU try-out must have exactly two commands: the demo and the tests"
    assert "dopsd demo" in blocks[0]
    test_cmd = blocks[1].strip()
    pattern = re.search(r"grep -m1 -E '(.*?)' README.md", ci).group(1)
    matches = [line for line in readme.splitlines() if re.search(pattern, line)]
    assert matches and matches[0] == test_cmd, ".ci/run must execute the README's test command"
    assert "-c constraints.txt" in test_cmd and "-c constraints.txt" in blocks[0]
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]
    assert "--ignore=tests/comfyui" in test_cmd  # the CI tier; .ci/host-tier runs tests/comfyui against ComfyUI
    assert re.search(r"^\.ci/host-tier$", ci, re.M), ".ci/run must run the host tier after the CI tier"
    assert "COMFYUI_PATH=" in (ROOT / ".ci" / "host-tier").read_text()


LAB_MODULES = ("study", "study_report", "chains", "stages", "experiment", "stats", "pretrain", "evaluator_training")
LAB_ONLY_WEIGHTS = ("toy_undistilled.safetensors",)


def test_the_lab_is_not_in_the_package():
    """The study, chains, experiment, stats and base training live in experiments/toy/lab, and the weights
    only the lab reads do not ship: neither the package's files nor its package-data globs hold them."""
    toy = ROOT / "dopsd_core" / "toy"
    assert not [m for m in LAB_MODULES if (toy / f"{m}.py").exists()]
    assert all((ROOT / "experiments" / "toy" / "lab" / f"{m}.py").is_file() for m in LAB_MODULES)
    assert not [p for p in (ROOT / "dopsd_core").rglob("*") if p.name in LAB_ONLY_WEIGHTS]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["dopsd_core*"]  # experiments/ is no package of the wheel
    shipped = {p for pattern in setuptools["package-data"]["dopsd_core"] for p in (ROOT / "dopsd_core").glob(pattern)}
    assert {p.name for p in shipped} >= {"toy_base.safetensors", "toy_evaluator.safetensors"}
    assert not [p for p in shipped if p.name in LAB_ONLY_WEIGHTS]
    assert (ROOT / "experiments" / "toy" / "lab" / "weights" / "toy_undistilled.safetensors").is_file()


def test_pyproject_dependencies_and_script():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in meta["dependencies"]}
    assert {"torch", "safetensors", "peft", "einops", "transformers", "pillow"} <= names
    torch_dep = next(d for d in meta["dependencies"] if d.startswith("torch"))
    assert "<" in torch_dep and ">=" in torch_dep, "torch must be a range, not a pin"
    assert any(d.startswith("bitsandbytes") for d in meta["optional-dependencies"]["8bit"])
    assert any(d.startswith("pytest") for d in meta["optional-dependencies"]["test"])
    assert meta["scripts"]["dopsd"] == "dopsd_core.cli:main"
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "dopsd" and ep.value == "dopsd_core.cli:main" for ep in eps), "package not installed"


def test_root_init_is_inert_outside_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('dopsd_pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['dopsd_pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web'\n"
        "assert callable(m.comfy_entrypoint)\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'torch')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"root __init__ imported {out.stdout}"


def test_python_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "dopsd_core", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "sample", "toy-data"):
        assert cmd in out.stdout


def test_the_readme_stays_a_user_page():
    """The README is for people installing from ComfyUI: under 20 KB, research in docs/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size < 20_000, f"README.md is {size} bytes; move reference material into docs/"

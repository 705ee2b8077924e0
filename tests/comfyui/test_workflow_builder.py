"""tools/build_workflows.py is the one source of the shipped workflows: run against real ComfyUI's
/object_info (this pack loaded), it reproduces every file in workflows/ byte for byte. A difference
means someone edited a workflow JSON by hand (move the change into the builder) or a node's inputs
changed (add the new widget's value to the builder's graphs and re-run it)."""
from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "workflows"


def _builder():
    spec = importlib.util.spec_from_file_location("dopsd_build_workflows", ROOT / "tools" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diff(expected: str, got: str, name: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(), got.splitlines(), f"workflows/{name}",
                                 f"built/{name}", lineterm="", n=2)
    return "\n".join(list(lines)[:60])


def test_builder_reproduces_the_shipped_files_from_the_server_url(comfy, tmp_path):
    written = _builder().write_workflows(comfy.url, tmp_path / "workflows")
    assert sorted(p.name for p in written) == sorted(p.name for p in SHIPPED.glob("*.json")), \
        "the builder and workflows/ disagree on which workflows ship"
    for path in written:
        expected, got = (SHIPPED / path.name).read_text(encoding="utf-8"), path.read_text(encoding="utf-8")
        assert got == expected, f"{path.name} differs from the builder's output:\n{_diff(expected, got, path.name)}"


def test_builder_takes_an_object_info_dict(comfy):
    built = _builder().build_workflows(comfy.get("/object_info"))
    assert set(built) == {p.name for p in SHIPPED.glob("*.json")}
    for name, workflow in built.items():
        assert workflow == json.loads((SHIPPED / name).read_text(encoding="utf-8")), name

"""nodes/paths.py without ComfyUI: what a node input may name. A networked ComfyUI serves strangers, so
every name from the page resolves inside the folder ComfyUI gives for it, or is refused with the fix."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paths():
    """The pack imported as a package (as ComfyUI imports it); nodes/paths.py needs no ComfyUI."""
    name = "dopsd_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return importlib.import_module(f"{name}.nodes.paths")


def test_an_image_folder_resolves_under_the_input_folder_or_a_dataset_root(paths, tmp_path):
    inp, extra = tmp_path / "input", tmp_path / "datasets"
    (inp / "cats").mkdir(parents=True)
    (extra / "dogs").mkdir(parents=True)
    assert paths.folder_inside("cats", [str(inp), str(extra)]) == inp / "cats"
    assert paths.folder_inside("dogs", [str(inp), str(extra)]) == extra / "dogs"  # the existing one wins
    assert paths.folder_inside("new", [str(inp)]) == inp / "new"  # missing: the loader reports it later
    assert paths.folder_inside(str(extra / "dogs"), [str(inp), str(extra)]) == extra / "dogs"


@pytest.mark.parametrize("name", ["../secrets", "/etc", "cats/../../x", "..", "/"])
def test_an_image_folder_outside_the_roots_is_refused_with_the_fix(paths, tmp_path, name):
    (tmp_path / "input" / "cats").mkdir(parents=True)
    with pytest.raises(Exception, match="outside ComfyUI's input folder.*sub-folder there"):
        paths.folder_inside(name, [str(tmp_path / "input")])


def test_run_names_are_plain_names(paths, tmp_path):
    assert paths.run_folder_inside("my_run-1.b", tmp_path) == tmp_path / "dopsd" / "my_run-1.b"
    for bad in ["", "../x", "a/b", ".hidden", "a..b", "x" * 101, "/abs"]:
        with pytest.raises(Exception, match="plain name"):
            paths.run_folder_inside(bad, tmp_path)


def test_lora_names_stay_in_the_loras_folder(paths, tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    assert paths.lora_file_inside("dopsd/cat", root) == (root / "dopsd" / "cat.safetensors").resolve()
    assert paths.lora_file_inside(" cat.safetensors ", root) == (root / "cat.safetensors").resolve()
    for bad in ["", "/etc/x", "../x", "a/../../x", "a\\b", "x;rm"]:
        with pytest.raises(Exception, match="relative name|escapes"):
            paths.lora_file_inside(bad, root)

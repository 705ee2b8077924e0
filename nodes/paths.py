"""Where a node may read and write: names from the page resolved only inside ComfyUI's folders.

A networked ComfyUI serves strangers: an input must never make the server read or write elsewhere on its
disk. These checks take the roots as arguments (the nodes pass ComfyUI's folders), so they import nothing
of ComfyUI and are tested without it (tests/nodes/test_paths.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..dopsd_core.errors import DopsdError
from .live import RUN_NAME

LORA_NAME = re.compile(r"[A-Za-z0-9_.\- /]+")
DATASET_ROOTS = "dopsd_datasets"  # extra_model_paths.yaml may name more dataset roots under this key


def folder_inside(name: str, roots: list[str]) -> Path:
    """The image folder a node input names, resolved only under the allowed roots (the first root is
    ComfyUI's input folder), as ComfyUI's loaders resolve file names under their folders. Checked on the
    normalised path, before anything is read; an existing folder wins over a missing one."""
    roots = [os.path.normpath(os.path.abspath(r)) for r in roots]
    inside = [p for p in (os.path.normpath(os.path.join(r, name)) for r in roots)  # an absolute name replaces r
              if any(p == r or p.startswith(r + os.sep) for r in roots)]
    if inside:
        return Path(next((p for p in inside if os.path.isdir(p)), inside[0]))
    raise DopsdError(f"folder {name!r} is outside ComfyUI's input folder {roots[0]}: put the images in a "
                     f"sub-folder there and give its name (e.g. 'my_concept'); more roots can be added as "
                     f"'{DATASET_ROOTS}' in extra_model_paths.yaml")


def run_folder_inside(run_name: str, output_dir: str | Path) -> Path:
    """output/dopsd/<run_name>; a plain name only."""
    if not RUN_NAME.fullmatch(run_name or ""):
        raise DopsdError(f"run_name {run_name!r} must be a plain name (letters, digits, _ . -), not a path")
    return Path(output_dir) / "dopsd" / run_name


def lora_file_inside(name: str, loras_root: str | Path) -> Path:
    """models/loras/<name>.safetensors; relative names only (sub-folders allowed), never outside loras/."""
    root = Path(loras_root).resolve()
    name = name.strip().removesuffix(".safetensors")
    if not name or not LORA_NAME.fullmatch(name) or name.startswith("/") or ".." in name.split("/"):
        raise DopsdError(f"LoRA name {name!r} must be a relative name like 'dopsd/my_concept' (letters, digits, "
                         "_ . - /), without '..'")
    path = (root / f"{name}.safetensors").resolve()
    if root not in path.parents:
        raise DopsdError(f"LoRA name {name!r} escapes the loras folder")
    return path

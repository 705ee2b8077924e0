"""Atomic writes: a reader (or a crash) never sees a half-written file. Only safetensors and JSON."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        storage = v.untyped_storage().data_ptr()
        if v.numel() and storage in seen:  # safetensors refuses shared storage (bnb's qmaps, views, slices)
            v = v.clone()
            storage = v.untyped_storage().data_ptr()
        seen.add(storage)
        out[k] = v
    tensors = out
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def save_json(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic_replace(path, write)


def link_file(src: Path, dst: Path) -> None:
    """dst becomes the same file as src, atomically: a hard link (no second write of a large file), or
    a copy where the filesystem has no hard links. Files here are only ever replaced, never edited in
    place, so the two names never diverge by accident."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_bytes(data: bytes, path: Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic_replace(path, write)

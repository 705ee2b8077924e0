"""What identifies a model, an encoder or a VLM folder in cache keys and run folders, without hashing
billions of parameters. The bottom of hosts/: it imports nothing of the package."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def sampled_weights_hash(module: torch.nn.Module) -> str:
    """Names, shapes, dtypes and a sample of the values of a module's weights: identifies a model
    without hashing billions of parameters (which would take minutes)."""
    h = hashlib.sha256()
    for i, (name, p) in enumerate(module.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if i % 16 == 0:
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_id(obj, *attrs: str) -> str:
    """Identity of an encoder or VAE for the dataset cache key: a sampled hash of the weights of its
    first module found under `attrs`, else its type name."""
    module = next((m for m in (getattr(obj, a, None) for a in attrs) if m is not None), None)
    return sampled_weights_hash(module) if module is not None else type(obj).__name__


def clip_id(clip) -> str:
    return weights_id(clip, "encoder", "cond_stage_model")


def vae_id(vae) -> str:
    return weights_id(vae, "first_stage_model")


def vlm_fingerprint(folder: str | Path) -> str:
    """Identity of a VLM folder for the dataset cache: path, config and the weight files' sizes/mtimes."""
    folder = Path(folder)
    h = hashlib.sha256(str(folder.resolve()).encode())
    h.update((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]

"""Image folders: images (.png .jpg .jpeg .webp) with same-name .txt captions (one variant per line)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DopsdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ImageItem:
    name: str
    image: torch.Tensor  # [3, H, W] float in [0, 1]
    captions: list[str]  # caption variants; one is drawn per step


def read_captions(txt: Path) -> list[str]:
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DopsdError(f"caption file {txt} is not UTF-8 text; save it as UTF-8") from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise DopsdError(f"caption file {txt} is blank; write at least one caption line (e.g. 'a photo of [V]')")
    return captions


# Aspect buckets: an image keeps its aspect ratio (clamped to MAX_ASPECT) at about resolution² pixels,
# both sides multiples of 64 from 512 px up (FLUX.2 and Z-Image need 16: VAE /8, patch 2; 64 keeps the
# number of buckets small, so batches of one bucket fill up, as in ai-toolkit and kohya's scripts) and
# of resolution/8 below, so small resolutions still keep the aspect ratio.
MAX_ASPECT = 2.0


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(W, H) of the bucket an image of width x height goes to: the aspect ratio kept as closely as the
    side multiple allows, the area about resolution²."""
    multiple = max(16, min(64, resolution // 8))
    aspect = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    w = max(multiple, round(resolution * aspect ** 0.5 / multiple) * multiple)
    h = max(multiple, round(resolution / aspect ** 0.5 / multiple) * multiple)
    return w, h


def load_rgb(path: Path, resolution: int, buckets: bool = False) -> torch.Tensor:
    """Decode, convert to RGB, resize to cover the target size and centre-crop to it. The target is
    a resolution² square, or with `buckets` the image's aspect bucket (`bucket_size`)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DopsdError(f"image {path} cannot be decoded ({type(e).__name__}); replace or remove it") from None
    return fit_image(im, *(bucket_size(*im.size, resolution) if buckets else (resolution, resolution)))


def fit_image(im: Image.Image, width: int, height: int) -> torch.Tensor:
    """Scale to cover width x height (bicubic), centre-crop -> [3, height, width] float in [0, 1]."""
    w, h = im.size
    scale = max(width / w, height / h)
    im = im.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - width) // 2, (h - height) // 2
    im = im.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DopsdError(f"data folder {folder} does not exist; pass a folder of images with .txt captions")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DopsdError(f"data folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                         "add images with same-name .txt captions")
    return files


def load_image_folder(folder: Path, resolution: int, buckets: bool = False) -> list[ImageItem]:
    files = image_files(folder)
    missing = [p.name for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DopsdError(f"image {missing[0]} has no caption file {Path(missing[0]).stem}.txt"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                         "add one caption per line next to each image")
    return [ImageItem(p.name, load_rgb(p, resolution, buckets), read_captions(p.with_suffix(".txt"))) for p in files]


def folder_fingerprint(folder: Path) -> str:
    """Content hash of the images and captions a run trains on (resume refuses other data)."""
    h = hashlib.sha256()
    for p in image_files(folder):
        h.update(p.name.encode())
        h.update(p.read_bytes())
        txt = p.with_suffix(".txt")
        if txt.is_file():
            h.update(txt.read_bytes())
    return h.hexdigest()[:16]

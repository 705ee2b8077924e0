"""Loss curves and image grids drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .fileio import save_bytes


def smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def loss_plot(history: list[float], width: int = 640, height: int = 360, title: str = "",
              log_scale: bool = True) -> Image.Image:
    """Raw loss (light) and its EMA (dark) against the step; log y-axis when all values are > 0."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 25, height - 30
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    draw.text((left, 5), f"{title}  loss ({len(history)} steps)", fill=(0, 0, 0))
    finite = [v for v in history if math.isfinite(v)]
    if not finite:
        draw.text((left + 10, top + 10), "no finite loss values yet", fill=(0, 0, 0))
        return img
    use_log = log_scale and min(finite) > 0
    f = (lambda v: math.log10(v)) if use_log else (lambda v: v)
    lo, hi = f(min(finite)), f(max(finite))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(history)

    def xy(i, v):
        x = left + (right - left) * (i / max(1, n - 1))
        y = bottom - (bottom - top) * ((f(v) - lo) / (hi - lo))
        return x, y

    for series, colour in ((history, (160, 190, 230)), (smooth(history), (20, 60, 160))):
        pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
    label = (lambda v: f"{10 ** v:.3g}") if use_log else (lambda v: f"{v:.3g}")
    draw.text((5, top), label(hi), fill=(0, 0, 0))
    draw.text((5, bottom - 10), label(lo), fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 8), f"step {n}", fill=(0, 0, 0))
    return img


def write_loss_files(history: list[float], out_dir: Path, title: str = "") -> None:
    out_dir = Path(out_dir)
    csv = "step,loss\n" + "".join(f"{i + 1},{v:.8g}\n" for i, v in enumerate(history))
    save_bytes(csv.encode(), out_dir / "loss.csv")
    save_png(loss_plot(history, title=title), out_dir / "loss.png")


def save_png(img: Image.Image, path: Path) -> None:
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    save_bytes(buf.getvalue(), Path(path))


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H, W, 3] float in [0, 1] -> PIL."""
    return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def image_grid(rows: list[torch.Tensor], scale: int = 1, pad: int = 2) -> Image.Image:
    """rows: list of [N, H, W, 3] tensors (same N, H, W) -> one grid image, one tensor per row."""
    n, h, w = rows[0].shape[:3]
    h, w = h * scale, w * scale
    grid = Image.new("RGB", (n * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for i in range(n):
            tile = to_pil(row[i]).resize((w, h), Image.NEAREST)
            grid.paste(tile, (pad + i * (w + pad), pad + r * (h + pad)))
    return grid

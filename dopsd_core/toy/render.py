"""Procedural toy images: coloured shapes on plain backgrounds, 32x32 RGB, with captions.

Six shapes are seen by the base model; three more (star, heart, crescent) are never shown to it and
are the new concepts a LoRA learns, each with its own concept token.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .text import BACKGROUNDS, COLOURS, SEEN_SHAPES

HELD_OUT_SHAPES = ("star", "heart", "crescent")
ALL_SHAPES = SEEN_SHAPES + HELD_OUT_SHAPES
CONCEPT_TOKEN = {"star": "[V1]", "heart": "[V2]", "crescent": "[V3]"}
# What each concept token draws in the base without a reference: an outline of its own, as a rare word
# ("sks") means something to a real text encoder. Up to run 8 the tokens only ever named whatever the
# reference showed, so the base drew the same shapeless blob for all of them, and a LoRA that taught
# [V1] a star drew stars for [V2] and [V3] prompts too. Chosen once by tools/token_outlines.py
# (area >= 0.4 of the circle's, IoU <= 0.68 with every known shape and <= 0.55 with each other, never
# called star/heart/crescent by the evaluator) and fixed forever, like the vocabulary.
TOKEN_OUTLINE = {"[v]": "blob:3", "[v1]": "blob:133", "[v2]": "blob:155", "[v3]": "blob:193", "[v4]": "blob:290",
                 "[v5]": "blob:843", "[v6]": "blob:1390", "[v7]": "blob:2090", "[v8]": "blob:27"}

RGB = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 1.0), "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9), "magenta": (0.9, 0.15, 0.9), "white": (0.97, 0.97, 0.97), "orange": (1.0, 0.55, 0.05),
    "black": (0.0, 0.0, 0.0), "gray": (0.45, 0.45, 0.45), "navy": (0.05, 0.05, 0.35), "maroon": (0.35, 0.05, 0.08),
}
SIZE = 32
# Layout ranges. Narrower than runs 1-6 (centre +-4 px, radius 7-10.5, angle +-0.25): the narrower
# the layouts, the more the mean image of one shape word differs from another's, and at the noise
# levels where the 4-step grid decides the shape (sigma .9-.75) that mean is all the word can say.
# Narrowing them took 16-step shape accuracy from 52 % to 77 % in 3000 steps (run 7).
JITTER = 1.5  # px: how far a shape's centre strays from the image centre
RADIUS = (8.0, 10.5)  # px
MAX_ANGLE = 0.15  # radians: small rotations only
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # pixels
    angle: float = 0.0  # radians; small rotations only (shapes stay recognisable)

    @property
    def size_word(self) -> str:
        return "small" if self.radius < sum(RADIUS) / 2 else "large"


def shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inside-test on coordinates normalised so the shape's radius is 1 (y points down)."""
    r = torch.sqrt(x**2 + y**2)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) <= 0.8
    if shape == "triangle":  # equilateral, pointing up, circumradius 1: apex (0, -1), base at y = 0.5
        return (y <= 0.5) & (x.abs() <= (y + 1.0) / math.sqrt(3))
    if shape == "cross":
        return ((x.abs() <= 0.3) & (y.abs() <= 1.0)) | ((y.abs() <= 0.3) & (x.abs() <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "diamond":
        return x.abs() + y.abs() <= 1.0
    if shape == "star":  # five points, inner radius 0.42
        theta = torch.atan2(x, -y)
        sector = torch.remainder(theta, 2 * math.pi / 5) - math.pi / 5
        inner, outer = 0.42, 1.0
        # boundary of the star along angle `sector` in one point's wedge: line from (outer, 0) to (inner, pi/5)
        a = math.pi / 5
        px, py = outer, 0.0
        qx, qy = inner * math.cos(a), inner * math.sin(a)
        sx, sy = r * torch.cos(sector.abs()), r * torch.sin(sector.abs())
        cross = (qx - px) * (sy - py) - (qy - py) * (sx - px)
        return cross >= 0
    if shape == "heart":
        hx, hy = x * 1.15, -(y * 1.15) + 0.25
        return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    if shape == "crescent":
        return (r <= 1.0) & (torch.sqrt((x - 0.45) ** 2 + (y + 0.1) ** 2) > 0.8)
    if shape.startswith("blob:"):
        return _blob_mask(int(shape[5:]), x, y, r)
    raise ValueError(f"unknown shape {shape!r}")


def _blob_mask(seed: int, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A random outline: star-convex (4-11 vertices, radii 0.2-1, radius linear in angle between them),
    half of them with a random disc cut out (concave bites, holes; at most half the area). Random blobs are
    never named in captions: the base model sees them only as copy references, so that it learns to
    reproduce whatever outline the reference shows instead of picking the nearest seen shape. The nine
    blobs of TOKEN_OUTLINE are the exception: each is its concept token's meaning."""
    rng = random.Random(seed)
    n = rng.randint(4, 11)
    radii = torch.tensor([rng.uniform(0.2, 1.0) for _ in range(n)] * 2)
    theta = torch.remainder(torch.atan2(x, -y) + rng.uniform(0, 2 * math.pi), 2 * math.pi) * n / (2 * math.pi)
    i = theta.floor().long().clamp(max=n - 1)
    frac = theta - i
    inside = r <= radii[i] * (1 - frac) + radii[i + 1] * frac
    if rng.random() < 0.5:
        bx, by, br = rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0.3, 0.8)
        bitten = inside & ((x - bx) ** 2 + (y - by) ** 2 > br**2)
        if bitten.sum() >= 0.5 * inside.sum():  # a bite, not the whole outline
            inside = bitten
    return inside


def render(scene: Scene) -> torch.Tensor:
    """Scene -> image [3, 32, 32] in [0, 1], anti-aliased by 4x supersampling."""
    n = SIZE * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    x, y = (xx - scene.cx) / scene.radius, (yy - scene.cy) / scene.radius
    if scene.angle:
        c, s = math.cos(scene.angle), math.sin(scene.angle)
        x, y = c * x + s * y, -s * x + c * y
    cover = F.avg_pool2d(shape_mask(scene.shape, x, y).float()[None, None], SUPERSAMPLE)[0]  # [1, 32, 32]
    fg = torch.tensor(RGB[scene.colour]).view(3, 1, 1)
    bg = torch.tensor(RGB[scene.background]).view(3, 1, 1)
    return bg + (fg - bg) * cover


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, shapes=SEEN_SHAPES) -> Scene:
    radius = rng.uniform(*RADIUS)
    # Centre within +-JITTER px of the middle. With positions over the whole frame (runs 1-3) the mean
    # image given a shape word is the same diffuse blob for every shape, so at high noise the word
    # carried no signal and a small DiT drew right-coloured blobs of the wrong shape after 8-12k steps.
    cx, cy = (SIZE / 2 + rng.uniform(-JITTER, JITTER) for _ in range(2))
    return Scene(shape or rng.choice(shapes), colour or rng.choice(COLOURS), background or rng.choice(BACKGROUNDS),
                 cx, cy, radius, rng.uniform(-MAX_ANGLE, MAX_ANGLE))


def random_blob_scene(rng: random.Random) -> Scene:
    return random_scene(rng, shape=f"blob:{rng.randrange(1 << 30)}")


def caption_variants(scene: Scene, shape_word: str | None = None) -> list[str]:
    """Several phrasings of one scene; shape_word replaces the shape name (a concept token)."""
    w = shape_word or scene.shape
    return [
        f"a {scene.size_word} {scene.colour} {w} on a {scene.background} background",
        f"a {scene.colour} {w} on a {scene.background} background",
        f"{scene.colour} {w}, {scene.background} background",
        f"a {scene.colour} {w}",
    ]


def concept_scenes(shape: str, n: int = 6, seed: int = 0) -> list[Scene]:
    """The fixed training images of a held-out concept: n scenes of one shape in varied colours,
    backgrounds and layouts (deterministic)."""
    rng = random.Random(f"concept-{shape}-{seed}")
    colours = rng.sample(COLOURS, k=min(n, len(COLOURS)))
    return [random_scene(rng, shape, colours[i % len(colours)], BACKGROUNDS[i % len(BACKGROUNDS)]) for i in range(n)]


def export_concept_folder(shape: str, out: Path, n: int = 6, seed: int = 0) -> list[Scene]:
    """Write the concept's images as PNG + .txt caption variants (with its concept token): a data
    folder that `dopsd train --data` and the ComfyUI dataset node read like any user folder."""
    from ..plot import save_png, to_pil
    from ..fileio import save_bytes
    out = Path(out)
    scenes = concept_scenes(shape, n, seed)
    for i, sc in enumerate(scenes):
        save_png(to_pil(render(sc).permute(1, 2, 0)), out / f"{shape}_{i:02d}.png")
        save_bytes(("\n".join(caption_variants(sc, CONCEPT_TOKEN[shape])) + "\n").encode(), out / f"{shape}_{i:02d}.txt")
    return scenes


def prior_prompts() -> list[str]:
    """The toy's generic prompts for --prior-prompts auto: every seen shape in every colour without a
    background, every seen shape on every background without a colour, and the concept tokens no
    held-out concept uses ([V4]..[V8]). Worded differently from every evaluation prompt set in metrics.py, so
    that retention and leak are measured on prompts the prior never trained on."""
    from .text import CONCEPT_TOKENS
    free_tokens = [t.upper() for t in CONCEPT_TOKENS if t.upper() not in CONCEPT_TOKEN.values() and t != "[v]"]
    return ([f"a {c} {s}" for s in SEEN_SHAPES for c in COLOURS]
            + [f"a {s} on a {b} background" for s in SEEN_SHAPES for b in BACKGROUNDS]
            + [f"a {c} {t} on a {b} background" for i, t in enumerate(free_tokens)
               for c, b in zip(COLOURS[i::2], BACKGROUNDS)])

"""Toy-world metrics, defined once and used everywhere (demo, experiment, acceptance tests).

concept_fidelity  share of 4-step samples of the concept's prompts (its training captions, then new
                  colour/background combinations with its token: 24 prompts x 4 noise seeds = 96 samples)
                  that the evaluator labels as the concept's shape
retention         joint shape+colour accuracy of 4-step samples on fixed seen prompts unrelated to the concept
leak              share of those unrelated prompts' samples drawn as the concept's shape
cross_token       share of samples of the other held-out concepts' token prompts drawn as this concept's shape
                  (a LoRA that learned "any concept token" rather than its own)
quality_4/_32     toy-FID of 4-/32-step samples of those prompts against real renderings (lower is better)
few_step_gap      quality_4 - quality_32
drift             mean per-image pixel L2 between the model's and the base's 4-step samples (same seeds)
"""
from __future__ import annotations

import functools
import random

import torch

from ..denoiser import sample
from .denoiser import Guided, ToyContext, ToyDenoiser, image_to_latent, latent_to_image
from .evaluator import Evaluator, frechet_distance
from .render import CONCEPT_TOKEN, caption_variants, random_scene, render
from .text import BACKGROUNDS, COLOURS, SEEN_SHAPES


def unrelated_prompts(n: int = 192, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(prompt, shape, colour, background): every seen shape x colour in turn, random backgrounds."""
    rng = random.Random(f"unrelated-{seed}")
    out = []
    for i in range(n):
        shape, colour = SEEN_SHAPES[i % len(SEEN_SHAPES)], COLOURS[(i // len(SEEN_SHAPES)) % len(COLOURS)]
        bg = rng.choice(BACKGROUNDS)
        out.append((f"a {colour} {shape} on a {bg} background", shape, colour, bg))
    return out


FIDELITY_PROMPTS, FIDELITY_SEEDS = 24, 4  # 96 concept samples per evaluation
CROSS_PROMPTS = 24  # per other concept token


def token_prompts(token: str, n: int, seed: int = 0) -> list[str]:
    """n prompts "a <colour> <token> on a <background> background" with seeded colours and backgrounds."""
    rng = random.Random(f"concept-prompts-{token}-{seed}")
    return [f"a {rng.choice(COLOURS)} {token} on a {rng.choice(BACKGROUNDS)} background" for _ in range(n)]


def concept_prompts(shape: str, train_captions: list[str], n: int = FIDELITY_PROMPTS, seed: int = 0) -> list[str]:
    """n prompts with the concept's token: its training captions first, then new combinations."""
    train = list(train_captions)[:n]
    return train + token_prompts(CONCEPT_TOKEN[shape], n - len(train), seed)


def cross_token_prompts(shape: str, n: int = CROSS_PROMPTS, seed: int = 0) -> list[str]:
    """The other held-out concepts' token prompts (a LoRA for `shape` should not draw it for them)."""
    return [p for other, token in CONCEPT_TOKEN.items() if other != shape for p in token_prompts(token, n, seed)]


def hit_string(hits) -> str:
    """Per-sample 0/1 outcomes as a compact string (result files keep them for bootstrap intervals)."""
    return "".join("1" if h else "0" for h in hits)


@torch.no_grad()
def generate(den: ToyDenoiser, prompts: list[str], steps: int, seed: int = 0, refs: torch.Tensor | None = None,
             chunk: int = 96, guidance: float = 1.0) -> torch.Tensor:
    """steps-step samples, one per prompt -> images [N, 3, 32, 32] in [0, 1]. refs: optional reference
    latents [N, 3, 32, 32] (the teacher context). guidance != 1: classifier-free guidance (the
    undistilled base; the distilled turbo model samples without it)."""
    if guidance != 1.0:
        den = Guided(den, guidance)
    gen = torch.Generator().manual_seed(seed)
    sigmas = den.sigma_grid(steps)
    out = []
    for i in range(0, len(prompts), chunk):
        texts = den.text_encoder.encode(prompts[i:i + chunk])
        ctx = ToyContext(texts, None if refs is None else refs[i:i + chunk])
        out.append(latent_to_image(sample(den, ctx, (len(texts), *den.latent_shape), sigmas, gen)))
    return torch.cat(out)


def foreground(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """images [N, 3, H, W] -> bool masks [N, H, W]: pixels away from the background colour (the corners'
    median; every toy scene has its shape in the middle)."""
    corners = torch.stack([images[:, :, 0, 0], images[:, :, 0, -1], images[:, :, -1, 0], images[:, :, -1, -1]])
    background = corners.median(0).values[:, :, None, None]  # [N, 3, 1, 1]
    return (images - background).abs().amax(1) > threshold


@functools.lru_cache(maxsize=1)
def _outline_templates() -> torch.Tensor:
    """Masks [9, T, 32, 32] of each token outline over the layouts the renderer draws (radius, centre); built
    once per process (243 supersampled renders), since token_identity matches nine batches per model."""
    from .render import RADIUS, SIZE, TOKEN_OUTLINE, Scene
    layouts = [(SIZE / 2 + dx, SIZE / 2 + dy, r) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
               for r in (RADIUS[0], sum(RADIUS) / 2, RADIUS[1])]
    return torch.stack([torch.stack([render(Scene(shape, "white", "black", cx, cy, r))[0] > 0.5
                                     for cx, cy, r in layouts]) for shape in TOKEN_OUTLINE.values()])


def outline_matches(images: torch.Tensor) -> list[str]:
    """The concept token whose outline (render.TOKEN_OUTLINE) best fits each image's foreground, by IoU
    against every layout: what the evaluator cannot say, since it knows the nine shapes but no token's
    outline."""
    from .render import TOKEN_OUTLINE
    fg = foreground(images)[:, None, None]  # [N, 1, 1, H, W]
    t = _outline_templates()[None]  # [1, 9, T, H, W]
    iou = (fg & t).sum((-1, -2)) / (fg | t).sum((-1, -2)).clamp(min=1)  # [N, 9, T]
    tokens = list(TOKEN_OUTLINE)
    return [tokens[i] for i in iou.amax(2).argmax(1).tolist()]


def token_identity(den: ToyDenoiser, n: int = 24, seed: int = 0) -> dict[str, float]:
    """Per concept token: the share of its prompts' 4-step samples drawn with its own outline (chance 1/9).
    The base since run 9 draws each token's outline; a LoRA should leave the tokens it was not taught."""
    from .render import TOKEN_OUTLINE
    out = {}
    for token in TOKEN_OUTLINE:
        got = outline_matches(generate(den, token_prompts(token.upper(), n, seed), 4, seed))
        out[token.upper()] = sum(g == token for g in got) / n
    return out


def real_renderings(prompts: list[tuple[str, str, str, str]], seed: int = 0) -> torch.Tensor:
    rng = random.Random(f"real-{seed}")
    return torch.stack([render(random_scene(rng, shape, colour, bg)) for _, shape, colour, bg in prompts])


class ToyMetrics:
    """Holds the evaluator, the fixed prompt sets, the real-image features and the base samples."""

    def __init__(self, evaluator: Evaluator, base: ToyDenoiser, n_unrelated: int = 192, seed: int = 0,
                 n_fidelity: int = FIDELITY_PROMPTS, n_cross: int = CROSS_PROMPTS):
        """n_*: the sizes of the prompt sets (fidelity: concept prompts, each sampled with FIDELITY_SEEDS
        seeds; cross: per other concept token). Smaller sets only for tests of the plumbing."""
        self.ev, self.seed = evaluator, seed
        self.n_fidelity, self.n_cross = n_fidelity, n_cross
        self.unrelated = unrelated_prompts(n_unrelated, seed)
        self.real_features = evaluator.features(real_renderings(self.unrelated, seed))
        self.base_samples_4 = self.unrelated_samples(base)

    def retention_hits(self, images: torch.Tensor) -> list[bool]:
        shapes, colours = self.ev.classify(images)
        return [s == want_s and c == want_c for s, c, (_, want_s, want_c, _) in zip(shapes, colours, self.unrelated)]

    def retention(self, images: torch.Tensor) -> float:
        hits = self.retention_hits(images)
        return sum(hits) / len(hits)

    def quality(self, images: torch.Tensor) -> float:
        return frechet_distance(self.ev.features(images), self.real_features)

    def shape_hits(self, images: torch.Tensor, shape: str) -> list[bool]:
        shapes, _ = self.ev.classify(images)
        return [s == shape for s in shapes]

    def concept_fidelity(self, images: torch.Tensor, shape: str) -> float:
        hits = self.shape_hits(images, shape)
        return sum(hits) / len(hits)

    @torch.no_grad()
    def evaluate(self, den: ToyDenoiser, concept: str | None = None, train_captions: list[str] | None = None,
                 quality: bool = True) -> dict:
        """The metrics above; with a concept also its per-sample outcomes under "hits" (fidelity: prompt-major,
        seed-minor; retention and leak: the unrelated prompts in order; cross_token: other tokens' prompts).
        quality=False skips the 32-step samples (quality_32, few_step_gap): 4-step metrics only."""
        s4 = self.unrelated_samples(den)
        retention = self.retention_hits(s4)
        out = {"retention": sum(retention) / len(retention), "quality_4": self.quality(s4),
               "drift": (s4 - self.base_samples_4).flatten(1).norm(dim=1).mean().item()}
        if quality:
            out.update(self.few_step_quality(den, out["quality_4"]))
        if concept:
            values, hits = self.concept_metrics(den, concept, train_captions or [], s4)
            out.update(values, hits={**hits, "retention": hit_string(retention)})
        return out

    def unrelated_samples(self, den: ToyDenoiser, steps: int = 4) -> torch.Tensor:
        return generate(den, [p for p, *_ in self.unrelated], steps, self.seed)

    @torch.no_grad()
    def few_step_quality(self, den: ToyDenoiser, quality_4: float | None = None) -> dict:
        """toy-FID of the unrelated prompts' 4- and 32-step samples and their difference (quality_4: already
        measured on the same samples)."""
        q4 = self.quality(self.unrelated_samples(den)) if quality_4 is None else quality_4
        q32 = self.quality(self.unrelated_samples(den, 32))
        return {"quality_4": q4, "quality_32": q32, "few_step_gap": q4 - q32}

    @torch.no_grad()
    def concept_metrics(self, den: ToyDenoiser, concept: str, train_captions: list[str],
                        unrelated_4: torch.Tensor) -> tuple[dict, dict]:
        """concept_fidelity, leak (on unrelated_4, the unrelated prompts' 4-step samples) and cross_token,
        and their per-sample hit strings."""
        cp = concept_prompts(concept, train_captions, n=self.n_fidelity, seed=self.seed)
        per_seed = [self.shape_hits(generate(den, cp, 4, self.seed + 1 + k), concept) for k in range(FIDELITY_SEEDS)]
        fidelity = [h for prompt_hits in zip(*per_seed) for h in prompt_hits]  # prompt-major
        leak = self.shape_hits(unrelated_4, concept)
        cross = self.shape_hits(generate(den, cross_token_prompts(concept, self.n_cross, self.seed), 4, self.seed + 1), concept)
        values = {"concept_fidelity": sum(fidelity) / len(fidelity), "leak": sum(leak) / len(leak),
                  "cross_token": sum(cross) / len(cross)}
        hits = {"concept_fidelity": hit_string(fidelity), "fidelity_seeds": FIDELITY_SEEDS, "leak": hit_string(leak),
                "cross_token": hit_string(cross)}
        return values, hits

    @torch.no_grad()
    def teacher_fidelity(self, den: ToyDenoiser, concept: str, images: torch.Tensor, captions: list[list[str]],
                         seeds: int = 2) -> float:
        """concept_fidelity of the teacher: the training caption plus the target image in context."""
        prompts, refs = [], []
        for img, caps in zip(images, captions):
            for cap in caps:
                for _ in range(seeds):
                    prompts.append(cap)
                    refs.append(image_to_latent(img))
        return self.concept_fidelity(generate(den, prompts, 4, self.seed + 2, refs=torch.stack(refs)), concept)


def concept_training_set(shape: str, n: int = 6) -> tuple[torch.Tensor, list[list[str]]]:
    """The concept's training images [n, 3, 32, 32] and their caption variants (as exported)."""
    from .render import concept_scenes
    scenes = concept_scenes(shape, n)
    return (torch.stack([render(s) for s in scenes]),
            [caption_variants(s, CONCEPT_TOKEN[shape]) for s in scenes])

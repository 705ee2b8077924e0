"""The family spec: every fact about a model family that is a number, a name or a pattern, in one place.

The CLI, the ComfyUI nodes, tools/build_workflows.py, docs/method.md and the README's settings table read
it (the last two through tools/family_tables.py, checked by a test). How a family talks to ComfyUI (its
loaders, contexts and sampling code) is behaviour, in dopsd_core/hosts/families.py, which reads this.

Each default says where it comes from (`SOURCES`): `released` is the authors' released training setting
(D-OPSD, arXiv 2605.05204, and its scripts); anything else names what our choice rests on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DopsdError

RELEASED = "released"


@dataclass(frozen=True)
class GpuPreset:
    """What a consumer-GPU preset changes from the family defaults, for the card it names."""
    label: str  # the trainer node's gpu_preset option
    changes: dict


@dataclass(frozen=True)
class FamilySpec:
    name: str  # stored in datasets, run folders and LoRA metadata
    title: str  # in messages and tables
    lora_targets: str  # regex over diffusion-model module names
    blocks: str  # regex of the transformer blocks checkpointed one by one
    grid: str  # the roll-out sigma grid's rule: "simple" (ComfyUI simple schedule, model shift) or "flux2"
    k: int  # roll-out states per D-OPSD step
    sample_steps: int  # few-step sampling: previews, the sampler node
    lr: float
    rank: int
    alpha: float
    steps: int
    batch_size: int
    grad_accum: int
    prior_weight: float  # lambda of the prior term (with the dataset's `auto` prior prompts)
    prior_batch: int  # prior roll-outs per micro-batch
    resolution: int  # training resolution (pixels per side, about)
    # D-OPSD's cost levers (docs/method.md): supervised roll-out states of the concept term (all K, or that
    # many drawn at random), the prior term on every prior_every-th step (weighted that many times), and the
    # prior roll-outs' supervised states ("same": as `states`)
    states: str = "all"
    prior_every: int = 1
    prior_states: str = "same"
    fixed_resolution: int | None = None  # a model that knows one image size only
    teacher_suffix: str = ""  # appended to the caption in the teacher context
    generic_prompts: tuple[str, ...] = ()  # for prior_prompts `auto`; the toy's come from its vocabulary
    # default sample prompts: the concept ({trigger}) in settings its captions do not show
    new_settings: tuple[str, ...] = ()
    teacher_text: str = ""  # the teacher context in words (tables)
    grid_text: str = ""  # the roll-out grid in words (tables)
    sampling_text: str = ""  # sampling a trained LoRA (tables)
    gpu_presets: tuple[GpuPreset, ...] = ()
    sources: dict = field(default_factory=dict)  # setting -> RELEASED or what our choice rests on

    def train_defaults(self, method: str = "dopsd") -> dict:
        """The TrainConfig fields a new run takes from the family (everything else: TrainConfig's own). The
        cost levers are D-OPSD's: an SFT run keeps TrainConfig's (every state, the prior on every step)."""
        out = dict(lr=self.lr, rank=self.rank, alpha=self.alpha, steps=self.steps, batch_size=self.batch_size,
                   grad_accum=self.grad_accum, k=self.k, prior_weight=self.prior_weight, prior_batch=self.prior_batch)
        if method == "dopsd":
            out.update(states=self.states, prior_every=self.prior_every, prior_states=self.prior_states)
        return out

    def preset(self, label: str) -> dict:
        """The changes of a GPU preset; `family default` changes nothing."""
        if label == DEFAULT_PRESET:
            return {}
        for p in self.gpu_presets:
            if p.label == label:
                return dict(p.changes)
        names = ", ".join([DEFAULT_PRESET, *(p.label for p in self.gpu_presets)])
        raise DopsdError(f"gpu_preset {label!r} is not one of {self.title}'s presets ({names}); "
                         f"pick one of those")

    def sample_prompts(self, captions: list[str], trigger: str | None) -> list[str]:
        """The previews' prompts when the user gives none: two with the concept in a new setting (what it
        learned), two unrelated prompts from the generic ones (what it must keep). Without a trigger, the
        first two captions stand for the concept."""
        learned = [t.format(trigger=trigger) for t in self.new_settings[:2]] if trigger else list(dict.fromkeys(captions))[:2]
        generic = self.prompts_for_prior()
        kept = [generic[0], generic[len(generic) // 2]] if len(generic) > 1 else list(generic)
        return learned + kept

    def prompts_for_prior(self) -> list[str]:
        if self.name == "toy":
            from .toy.render import prior_prompts  # the toy's vocabulary, not a model
            return prior_prompts()
        return list(self.generic_prompts)


DEFAULT_PRESET = "family default"

# Generic prompts for the photo families' automatic prior: everyday subjects a concept LoRA must not change.
PHOTO_NEW_SETTINGS = ("a photo of {trigger} on a beach at sunset", "a watercolor painting of {trigger} in a city street")
GENERIC_PHOTO_PROMPTS = (
    "a photo of a man", "a photo of a woman", "a photo of a child", "a photo of a dog", "a photo of a cat",
    "a city street at night", "a mountain landscape at sunrise", "a bowl of fruit on a wooden table",
    "a red sports car", "a living room with a sofa", "a close-up portrait, studio lighting",
    "an oil painting of a harbour", "a watercolor of flowers", "a bird on a branch", "a plate of food",
)

# Consumer-GPU presets of the photo families: the peers' LoRA settings for these cards (8-bit AdamW and
# checkpointing on 12-24 GB, a smaller rank on 12 GB). Their memory is projected from CPU measurements
# (bench/memory.py -> bench/results/memory.json, the README's memory table), not yet measured on a GPU:
# with an fp8 base both fit the cards they name, except klein-9B on 12 GB, which needs `offload`.
PHOTO_PRESETS = (
    GpuPreset("12 GB (rank 16, 8-bit AdamW, checkpointing)",
              {"rank": 16, "alpha": 32.0, "optimizer": "adamw8bit", "checkpointing": True}),
    GpuPreset("16-24 GB (rank 32, 8-bit AdamW, checkpointing)",
              {"rank": 32, "alpha": 64.0, "optimizer": "adamw8bit", "checkpointing": True}),
)

_PHOTO_SOURCES = {
    "lr": RELEASED, "rank": RELEASED, "alpha": RELEASED, "k": RELEASED,
    "steps": RELEASED,
    "batch": "the released global batch 4, as 1 image x 4 accumulated micro-batches so that it fits 12-24 GB "
             "cards (the same gradient in expectation)",
    "prior": "ours: the toy study (experiments/toy/study) kept 88 % retention with the prior at lambda 1 and "
             "lost retention without it; the paper prescribes no prior",
    "resolution": "1024 px, the released training resolution",
    "gpu_presets": "ours: the peers' settings for these cards; memory projected from CPU measurements "
                   "(bench/memory.py), not yet measured on a GPU",
}

TOY = FamilySpec(
    name="toy", title="the built-in D-OPSD toy model",
    lora_targets=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    blocks=r"blocks\.\d+", grid="simple", k=4, sample_steps=4,
    lr=2e-3, rank=64, alpha=64.0, steps=400, batch_size=4, grad_accum=1, prior_weight=1.0, prior_batch=4,
    resolution=32, fixed_resolution=32,
    new_settings=("a yellow {trigger} on a navy background", "a large white {trigger} on a maroon background"),
    teacher_text="caption + the target's reference tokens",
    grid_text="ComfyUI `simple`, shift 3: 1, .9, .75, .5 → 0",
    sampling_text="4 steps, cfg 1, `euler` / `simple`",
    sources={"lr": "the toy study's levers stage (experiments/toy/study/results.md, \"Cost levers\"): rank 64 / "
                   "lr 2e-3 is the cheapest setting whose mean over 3 concepts x 3 seeds meets every aim, the "
                   "star's fidelity included (no cheaper prior or state lever kept the star at 80 %)",
             "steps": "the levers stage's rule: step 400 (38,400 model evaluations, 1.33x the earlier 300 steps at "
                      "rank 16); `dopsd demo` trains them in 4 minutes on 2 cores",
             "rank": "the levers stage (with the lr)", "alpha": "alpha = rank", "k": "the toy base's 4-step grid",
             "batch": "the study's batch 4", "prior": "the study: lambda 1, one prior roll-out per sample",
             "resolution": "the toy's only image size"},
)

FLUX2_KLEIN = FamilySpec(
    name="flux2-klein", title="FLUX.2-klein (4B/9B)",
    lora_targets=(r"double_blocks\.\d+\.((img_attn|txt_attn)\.(qkv|proj)|(img_mlp|txt_mlp)\.(0|2))"
                  r"|single_blocks\.\d+\.(linear1|linear2)"),
    blocks=r"(double_blocks|single_blocks)\.\d+", grid="flux2", k=4, sample_steps=4,
    lr=2e-5, rank=64, alpha=128.0, steps=3000, batch_size=1, grad_accum=4, prior_weight=1.0, prior_batch=1,
    resolution=1024,
    # the released teacher prompt: appended to the caption when the target is the reference image
    teacher_suffix=(" Make the main subject (facial/ip details), background, and overall composition "
                    "consistent with the reference image."),
    generic_prompts=GENERIC_PHOTO_PROMPTS, new_settings=PHOTO_NEW_SETTINGS, gpu_presets=PHOTO_PRESETS,
    sources=_PHOTO_SOURCES,
    teacher_text="caption + the released suffix + the target as a reference latent",
    grid_text="ComfyUI's `Flux2Scheduler` for the latent size (1024²: 1, .967, .908, .767 → 0)",
    sampling_text="4 steps, cfg 1 (`DOPSDFewStepSampler`, or stock `SamplerCustomAdvanced` + `Flux2Scheduler`)",
)

Z_IMAGE = FamilySpec(
    name="z-image", title="Z-Image-Turbo",
    lora_targets=r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.(w1|w2|w3))",
    blocks=r"(layers|noise_refiner|context_refiner)\.\d+", grid="simple", k=4, sample_steps=4,
    lr=1e-4, rank=64, alpha=128.0, steps=2000, batch_size=1, grad_accum=4, prior_weight=1.0, prior_batch=1,
    resolution=1024,
    generic_prompts=GENERIC_PHOTO_PROMPTS, new_settings=PHOTO_NEW_SETTINGS, gpu_presets=PHOTO_PRESETS,
    sources=_PHOTO_SOURCES,
    teacher_text="the target + caption through Qwen3-VL-4B spliced with Z-Image's Qwen3-4B (`DOPSDQwen3VLLoader`)",
    grid_text="ComfyUI `simple`, shift 3: 1, .9, .75, .5 → 0",
    sampling_text="4-8 steps, cfg 1 (`DOPSDFewStepSampler`, or stock `KSampler`)",
)

SPECS: tuple[FamilySpec, ...] = (TOY, FLUX2_KLEIN, Z_IMAGE)
NAMES = tuple(s.name for s in SPECS)
PRESET_LABELS = tuple(dict.fromkeys([DEFAULT_PRESET, *(p.label for s in SPECS for p in s.gpu_presets)]))


FAMILY_DEFAULT_FIELDS = ("steps", "rank", "lr", "batch_size", "grad_accum", "prior_batch", "prior_every",
                         "states", "prior_states")  # 0 or FAMILY_DEFAULT = the family's
FAMILY_DEFAULT = DEFAULT_PRESET  # a combo input's value that keeps the family's (or the preset's) setting


def node_config(spec: FamilySpec, gpu_preset: str, values: dict) -> dict:
    """The TrainConfig fields of a trainer node's inputs: the family's defaults, the inputs that have no
    'family default' value (optimizer, checkpointing, ...), then the GPU preset's changes (it overrides
    those: it is what makes the run fit the card it names), then the inputs of FAMILY_DEFAULT_FIELDS that
    are set (0 or FAMILY_DEFAULT keeps the family's or the preset's value). An explicit rank also sets
    alpha = rank."""
    cfg = {**spec.train_defaults(values.get("method", "dopsd")),
           **{k: v for k, v in values.items() if k not in FAMILY_DEFAULT_FIELDS}}
    cfg.update(spec.preset(gpu_preset))
    for name in FAMILY_DEFAULT_FIELDS:
        if values.get(name) and values[name] != FAMILY_DEFAULT:
            cfg[name] = values[name]
    if values.get("rank"):
        cfg["alpha"] = float(values["rank"])
    return cfg


def number_text(x: float) -> str:
    """A setting as people write it: learning rates as 1e-4, 3e-3, 2e-5; other numbers plain."""
    return f"{x:.0e}".replace("e-0", "e-") if 0 < x < 1e-2 else f"{x:g}"


def defaults_text(setting: str) -> str:
    """Each family's default of a setting, for tooltips and help: 'toy 300, flux2-klein 3000, ...'."""
    def text(x):
        return x if isinstance(x, str) else number_text(x)
    return ", ".join(f"{s.name} {text(getattr(s, setting))}" for s in SPECS)


def spec_named(name: str) -> FamilySpec:
    for s in SPECS:
        if s.name == name:
            return s
    raise DopsdError(f"unknown model family {name!r}; supported: {', '.join(NAMES)}")

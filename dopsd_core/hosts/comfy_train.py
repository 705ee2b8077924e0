"""Dataset building and training against ComfyUI's loaded objects (used by the nodes; imports comfy lazily).

The node layer only validates inputs and reports progress; everything that touches tensors is here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import ImageItem
from ..denoiser import Record
from ..distributed import SINGLE, Dist
from ..prior import Prior
from ..trainer import Callbacks, TrainConfig, Trainer
from .comfy import ComfyContext, ComfyDenoiser, lora_patches_model, make_weights_trainable
from .families import TeacherContext, check_same_family, detect_family


class LoraStateDict(dict):
    """A LORA_MODEL (plain dict of ComfyUI-layout tensors, as stock nodes expect) that also carries the
    run's safetensors metadata for DOPSDSaveLoRA."""

    def __init__(self, tensors: dict, metadata: dict[str, str]):
        super().__init__(tensors)
        self.metadata = dict(metadata)


@dataclass
class ComfyDataset:
    """What DOPSDDataset hands to the trainers: per image, its latent and per caption variant the
    student and teacher contexts (already encoded; the encoders can be unloaded)."""
    family: str
    records: list[Record]
    preview_contexts: list[ComfyContext] = field(default_factory=list)
    preview_captions: list[str] = field(default_factory=list)
    prior: Prior | None = None  # prior-preservation prompts, encoded as student (text-only) contexts
    trigger: str | None = None  # the concept's word in the captions (LoRA metadata, continual tuning)

    def __len__(self) -> int:
        return len(self.records)


def build_dataset(model_patcher, items: list[ImageItem], encode_text, teacher_context: TeacherContext, vae=None,
                  n_preview: int = 4, prior_captions: list[str] | None = None,
                  sample_captions: list[str] | None = None) -> ComfyDataset:
    """encode_text(caption) -> (cond_tensor [1, T, D], extra dict): the student's caption encoding.
    teacher_context(caption, latent, item) -> (cond_tensor, extra): the family's in-context teacher.
    prior_captions: prior-preservation prompts, encoded like the student's captions. sample_captions: the
    previews' prompts (None: the first n_preview images' first captions)."""
    import comfy.model_management as mm
    family = detect_family(model_patcher.model)
    den = ComfyDenoiser(model_patcher, family)
    latents = family.encode_images(items, vae)
    records = []
    with torch.inference_mode(False):
        for item, lat in zip(items, latents):
            lat = lat.clone()  # the VAE's latent: what reference latents take (extra_conds processes them)
            # The record's x0 (SFT's target, D-OPSD's shapes) lives where the model denoises: after the
            # latent format's scale and shift, as KSampler's process_latent_in (Z-Image: Flux's 0.3611/0.1159).
            x0 = den.base.process_latent_in(lat[None])[0].float()
            student, teacher = [], []
            for cap in item.captions:
                # a Cancel is honoured here too: the teacher encoders (Z-Image's Qwen3-VL) run no comfy op
                mm.throw_exception_if_processing_interrupted()
                cond, extra = encode_text(cap)
                student.append(den.context(cond, extra, lat))
                t_cond, t_extra = teacher_context(cap, lat, item)
                teacher.append(den.context(t_cond, t_extra, lat))
            records.append(Record(item.name, x0, list(item.captions), student, teacher))
        prior = Prior(list(prior_captions), [den.context(*encode_text(p), latents[0]) for p in prior_captions]) \
            if prior_captions else None
        if sample_captions:
            previews = [den.context(*encode_text(p), latents[0]) for p in sample_captions]
            preview_captions = list(sample_captions)
        else:
            previews = [r.student_ctx[0] for r in records[:n_preview]]
            preview_captions = [r.captions[0] for r in records[:n_preview]]
    return ComfyDataset(family.name, records, previews, preview_captions, prior)


def load_for_training(mp, offload: bool) -> None:
    """Put the model on its device through ComfyUI's own loader. offload: ComfyUI's partial load, as its
    TrainLoraNode does (memory_required=1e20): the blocks that do not fit stay in RAM and are cast to the
    GPU per forward (`comfy_cast_weights`); the LoRA hooks and per-block checkpointing sit on top of that.
    (Under ComfyUI's dynamic VRAM, its default on NVIDIA, weights are streamed on demand either way.)"""
    import comfy.model_management as mm
    mm.load_models_gpu([mp], memory_required=1e20 if offload else 0, force_full_load=not offload)


def train(model_patcher, dataset: ComfyDataset, cfg: TrainConfig, run_dir: Path, callbacks: Callbacks,
          resume: bool = False, init_lora: Path | None = None, offload: bool = False, teacher_check: str = "off",
          on_teacher_check=None, dist: Dist = SINGLE, data_dir: str | None = None):
    """Train on the MODEL's shared diffusion model; afterwards nothing stays injected. Returns
    (patched MODEL clone carrying the LoRA, LoRA state dict in ComfyUI layout, loss history).
    teacher_check (warn | stop | off): a new run first checks that its teacher draws the training images
    (teacher_check.py, the latent rule), writes <run>/teacher_check.json and passes the report to
    on_teacher_check; `stop` refuses to train on a failed check. dist: this process's share of a torchrun
    run (distributed.py); data_dir: the image folder, recorded in the run folder."""
    import comfy.model_management as mm
    family = check_same_family(model_patcher, dataset)
    mp = model_patcher.clone()
    load_for_training(mp, offload)
    den = ComfyDenoiser(mp, family)
    was_training = mm.in_training
    with torch.inference_mode(False), torch.enable_grad():
        make_weights_trainable(den.dm)
        mm.in_training = True  # FLUX.2 and Z-Image RoPE switch to a differentiable implementation
        try:
            trainer = Trainer(den, dataset.records, cfg, run_dir, callbacks, init_lora=init_lora, resume=resume,
                              preview_fn=_preview_with_contexts(den, dataset), prior=dataset.prior,
                              trigger=dataset.trigger, dist=dist, data_dir=data_dir)
            if teacher_check != "off" and not resume:
                _preflight(den, dataset, cfg, run_dir, teacher_check, on_teacher_check, write=dist.is_main)
            trainer.run()
            lora_sd = LoraStateDict({k: v.detach().clone() for k, v in den.lora().state_dict_comfy("student").items()},
                                    trainer.lora_metadata())
            history = list(trainer.history)
        finally:
            mm.in_training = was_training
            den.release()
    return lora_patches_model(model_patcher, lora_sd), lora_sd, history


def _preflight(den: ComfyDenoiser, dataset: ComfyDataset, cfg: TrainConfig, run_dir: Path, mode: str,
               on_report, write: bool = True) -> None:
    import logging

    from ..errors import DopsdError
    from ..fileio import save_json
    from ..teacher_check import check_teacher
    report = check_teacher(den, dataset.records, den.fam.sample_steps, seed=cfg.seed)
    if write:  # every rank checks (none waits on another), rank 0 reports
        save_json(report.to_dict(), Path(run_dir) / "teacher_check.json")
        logging.getLogger("dopsd").warning("[D-OPSD] %s", report.summary())
        if on_report:
            on_report(report)
    if not report.passed and mode == "stop":
        raise DopsdError(f"teacher_check stop: {report.advice} (report: {Path(run_dir) / 'teacher_check.json'})")


def _preview_with_contexts(den: ComfyDenoiser, dataset: ComfyDataset):
    """Previews from the dataset's cached contexts (a ComfyUI model has no prompt encoder of its own)."""
    from ..denoiser import sample

    @torch.no_grad()
    def preview():
        latent_shape = tuple(dataset.records[0].x0.shape)
        grid = den.sigma_grid(den.fam.sample_steps, latent_shape)
        out = []
        with den.lora().use("student"):
            # one prompt at a time, each on its own fixed noise: the sample prompts' contexts differ in
            # length (Z-Image's Qwen3 contexts are as long as the prompt) and cannot be batched
            for i, ctx in enumerate(dataset.preview_contexts):
                out.append(sample(den, den.batch_contexts([ctx]), (1, *latent_shape), grid,
                                  torch.Generator().manual_seed(1234 + i), device=dataset.records[0].x0.device))
        return torch.cat(out)
    return preview


# --- dataset cache on disk ---------------------------------------------------------------------------
CACHE_FORMAT = 2  # 2: record x0 in the model's latent space (1 kept the VAE's, wrong for Z-Image SFT)


def dataset_cache_key(family: str, model_id: str, encoder_id: str, items: list[ImageItem], extra: str = "") -> str:
    """Content key: the images' pixels, their captions, the model and the encoders that made the contexts."""
    import hashlib
    h = hashlib.sha256(f"{CACHE_FORMAT}|{family}|{model_id}|{encoder_id}|{extra}".encode())
    for item in items:
        h.update(item.name.encode())
        h.update("\n".join(item.captions).encode())
        h.update(item.image.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def dataset_cache_file(cache_dir: Path, model_patcher, family, items: list[ImageItem], inputs,
                       prior_captions: list[str] | None = None, sample_captions: list[str] | None = None) -> Path:
    """Where the dataset of these images, encoded with these inputs (and prior and sample prompts) for this
    MODEL, is cached. Without either the key is the one earlier versions computed."""
    encoder_id, extra = family.cache_identity(inputs)
    if prior_captions:
        extra += "|prior=" + "\n".join(prior_captions)
    if sample_captions:
        extra += "|samples=" + "\n".join(sample_captions)
    model_id = ComfyDenoiser(model_patcher, family).fingerprint()
    return Path(cache_dir) / f"{dataset_cache_key(family.name, model_id, encoder_id, items, extra)}.safetensors"


def save_dataset(ds: ComfyDataset, path: Path) -> None:
    """Records as safetensors (tensors) + metadata JSON (names, captions, structure): no pickle."""
    import json

    from ..fileio import save_tensors
    tensors, layout = {}, []

    def put(prefix: str, kwargs: dict) -> dict:
        spec = {}
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{k}"] = v
                spec[k] = "tensor"
            elif isinstance(v, list) and all(torch.is_tensor(t) for t in v):
                for j, t in enumerate(v):
                    tensors[f"{prefix}.{k}.{j}"] = t
                spec[k] = ["list", len(v)]
            else:
                spec[k] = ["const", v]
        return spec
    for i, r in enumerate(ds.records):
        tensors[f"{i}.x0"] = r.x0
        layout.append({"name": r.name, "captions": r.captions,
                       "student": [put(f"{i}.s{v}", c.kwargs) for v, c in enumerate(r.student_ctx)],
                       "teacher": [put(f"{i}.t{v}", c.kwargs) for v, c in enumerate(r.teacher_ctx)]})
    meta = {"family": ds.family, "layout": layout, "preview_captions": ds.preview_captions, "trigger": ds.trigger}
    if ds.prior:
        meta["prior"] = {"captions": ds.prior.captions,
                         "contexts": [put(f"p{i}", c.kwargs) for i, c in enumerate(ds.prior.contexts)]}
    meta["previews"] = [put(f"v{i}", c.kwargs) for i, c in enumerate(ds.preview_contexts)]
    save_tensors(tensors, path, {"dopsd.dataset": json.dumps(meta)})


def read_cached_dataset(path: Path) -> ComfyDataset | None:
    """The dataset cached at path, or None when there is none to trust. save_dataset writes the whole file
    or nothing (temp file, then rename), so an interrupted build leaves no entry; a file that still does
    not read back whole (cut short by a full disk or a copy, or of another format) is rebuilt rather than
    half used."""
    import logging
    if not Path(path).is_file():
        return None
    try:
        return load_dataset(path)
    except Exception as e:  # noqa: BLE001 - a cache entry either reads back whole or is rebuilt
        logging.getLogger("dopsd").warning("dataset cache %s is unreadable (%s); encoding the images again", path, e)
        return None


def load_dataset(path: Path) -> ComfyDataset:
    import json

    from ..fileio import load_tensors
    tensors, meta = load_tensors(path)
    meta = json.loads(meta["dopsd.dataset"])

    def get(prefix: str, spec: dict) -> ComfyContext:
        kwargs = {}
        for k, kind in spec.items():
            if kind == "tensor":
                kwargs[k] = tensors[f"{prefix}.{k}"]
            elif kind[0] == "list":
                kwargs[k] = [tensors[f"{prefix}.{k}.{j}"] for j in range(kind[1])]
            else:
                kwargs[k] = kind[1]
        return ComfyContext(kwargs)
    records = [Record(r["name"], tensors[f"{i}.x0"], r["captions"],
                      [get(f"{i}.s{v}", s) for v, s in enumerate(r["student"])],
                      [get(f"{i}.t{v}", s) for v, s in enumerate(r["teacher"])]) for i, r in enumerate(meta["layout"])]
    n = len(meta["preview_captions"])
    prior = meta.get("prior")
    prior = Prior(prior["captions"], [get(f"p{i}", c) for i, c in enumerate(prior["contexts"])]) if prior else None
    previews = ([get(f"v{i}", c) for i, c in enumerate(meta["previews"])] if "previews" in meta
                else [r.student_ctx[0] for r in records[:n]])  # a cache written before sample prompts
    return ComfyDataset(meta["family"], records, previews, meta["preview_captions"], prior, meta.get("trigger"))

"""The training loop: optimizer, accumulation, clipping, EMA teacher, NaN guard, saves and resume.

Read top to bottom: the config, then Trainer.__init__ (the setup: LoRA, optimizer, a new run folder or
a resumed one), Trainer.run (the loop), Trainer.train_step (one optimizer step), the batches and the
losses it draws, previews, and the save and resume, which dopsd_core/run_folder.py writes and reads.
Whatever stops a run keeps its last complete step: should_stop between steps, an exception a callback
raises (ComfyUI's Cancel from its progress hook), and an exception from inside a step (ComfyUI's Cancel
raised by the next comfy op of a forward, Ctrl-C, an error). A step that raises is rolled back first
(its gradients dropped, the RNG stream put back where the step began), so a resumed run draws what the
interrupted step drew. A non-finite loss is the exception: it stops at the last good save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, run_folder
from .denoiser import Denoiser, PromptDenoiser, Record, sample
from .distributed import SINGLE, Dist
from .errors import DopsdError, NonFiniteLoss, TrainingCancelled
from .fileio import load_tensors, save_tensors
from .lora import ADAPTERS, lora_metadata, read_lora_file
from .objectives import LOSS_WEIGHTS, STATES, TEACHERS, Batch, dopsd_backward, sft_backward
from .optim import OPTIMIZERS, SCHEDULES, build_optimizer, lr_at
from .plot import write_loss_files
from .prior import Prior, concepts_record, earlier_concepts

METHODS = ("dopsd", "sft")
PRIOR_CLASS_IMAGES = 32  # SFT's prior: at least this many class images (more when there are more prompts)


@dataclass
class TrainConfig:
    method: str = "dopsd"
    steps: int = 300
    rank: int = 16
    alpha: float = 16.0
    adapter: str = "lora"  # lora | lokr | loha (lora.py)
    lokr_factor: int = -1  # LoKr's Kronecker split (-1: near the square root of each dimension)
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    grad_clip: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    k: int = 4
    teacher: str = "ema"
    ema_decay: float = 0.9999
    loss_weight: str = "x0"
    states: str = "all"
    seed: int = 0
    prior_weight: float = 0.0  # lambda of the prior term (0: no prior preservation)
    prior_batch: int = 1  # prior roll-outs (D-OPSD) or class images (SFT) per micro-batch
    prior_every: int = 1  # the prior term on every k-th step only, weighted k times (the same pull on average)
    prior_states: str = "same"  # D-OPSD's prior roll-outs: supervised states as `states` ("same"), or all/one/two
    checkpointing: bool = False
    compile: bool = False  # torch.compile the denoiser's forward (numerics equal up to float rounding)
    save_every: int = 0  # 0: save only at the end
    preview_every: int = 0  # 0: no previews

    # Fields a resumed run may change; everything else must match the run folder.
    RESUMABLE_CHANGES = ("steps", "save_every", "preview_every", "checkpointing", "compile")

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise DopsdError(msg)
        if self.method not in METHODS:
            bad(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.steps <= 0:
            bad(f"--steps must be > 0 (got {self.steps})")
        if self.rank <= 0:
            bad(f"--rank must be > 0 (got {self.rank}); typical values are 8-64")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            bad(f"--alpha must be a positive number (got {self.alpha}); the usual choice is alpha = rank")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad(f"--lr must be a positive finite number (got {self.lr}); e.g. --lr 1e-4")
        if self.adapter not in ADAPTERS:
            bad(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            bad(f"--lokr-factor must be -1 (automatic) or >= 1 (got {self.lokr_factor})")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown LR schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.k < 1:
            bad(f"--k must be >= 1 (got {self.k}); the released recipe uses 4")
        if self.teacher not in TEACHERS:
            bad(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHERS)}")
        if self.loss_weight not in LOSS_WEIGHTS:
            bad(f"unknown loss weight {self.loss_weight!r}; choose one of {', '.join(LOSS_WEIGHTS)}")
        if self.states not in STATES:
            bad(f"unknown --states {self.states!r}; choose one of {', '.join(STATES)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            bad("--batch-size and --grad-accum must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"EMA decay must be in [0, 1) (got {self.ema_decay})")
        if self.warmup < 0 or self.save_every < 0 or self.preview_every < 0:
            bad("--warmup, --save-every and --preview-every must be >= 0")
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            bad(f"--prior-weight must be >= 0 (got {self.prior_weight}); 0 turns the prior off")
        if self.prior_batch < 1:
            bad(f"--prior-batch must be >= 1 (got {self.prior_batch})")
        if self.prior_every < 1:
            bad(f"--prior-every must be >= 1 (got {self.prior_every}); 1 = the prior on every step")
        if self.prior_states not in ("same", *STATES):
            bad(f"unknown --prior-states {self.prior_states!r}; choose one of same, {', '.join(STATES)}")
        if not (self.grad_clip > 0):
            bad(f"gradient clip must be > 0 (got {self.grad_clip})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float  # the step's loss: the concept term plus prior_weight x the prior term
    lr: float
    it_per_s: float
    eta_s: float
    grad_norm: float | None = None  # before clipping
    prior_loss: float | None = None  # the prior term alone (None without a prior): the run's measure of drift


@dataclass
class Callbacks:
    """Hooks the CLI and the ComfyUI nodes plug into. All optional."""
    on_step: Callable[[StepInfo], None] | None = None
    on_preview: Callable[[int, torch.Tensor, list[str]], None] | None = None  # step, preview_fn() output, prompts
    on_save: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    history: list[float] = field(default_factory=list)


class CompiledDenoiser:
    """The same denoiser with `denoise` run through torch.compile; every other attribute is the
    wrapped one's. Dynamo guards on the LoRA mode and the grad mode, so student, teacher and
    no-grad passes each get their own graph (compiled once, on first use)."""

    def __init__(self, denoiser: Denoiser):
        self._inner = denoiser
        self.denoise = torch.compile(denoiser.denoise)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Trainer:
    def __init__(self, denoiser: Denoiser, records: list[Record], cfg: TrainConfig, run_dir: Path,
                 callbacks: Callbacks | None = None, preview_prompts: list[str] | None = None,
                 init_lora: Path | None = None, resume: bool = False, data_dir: str | None = None,
                 preview_fn: Callable[[], torch.Tensor] | None = None, prior: Prior | None = None,
                 trigger: str | None = None, dist: Dist = SINGLE):
        self.den, self.records, self.cfg = denoiser, records, cfg.validate()
        self.dist = dist  # data parallelism (distributed.py): this rank's share of every global batch
        self.rows = dist.share(cfg.batch_size)
        self.prior_rows = dist.share(cfg.prior_batch, "prior batch") if cfg.prior_weight > 0 else None
        self.prior = prior if cfg.prior_weight > 0 else None
        if cfg.prior_weight > 0 and not (prior and prior.captions):
            raise DopsdError("a prior weight > 0 needs prior prompts (CLI: --prior-prompts auto or a file; ComfyUI: "
                             "the dataset node's prior_prompts)")
        self.run_dir = Path(run_dir)
        self.cb = callbacks or Callbacks()
        self.preview_prompts = list(preview_prompts or [])
        # previews: a caller-supplied function (e.g. ComfyUI: cached contexts, latents out) or the prompts
        self.preview_fn = preview_fn or (self.preview if self.preview_prompts else None)
        self.data_dir = data_dir
        if not records:
            raise DopsdError("the dataset is empty; add images with captions")
        self.buckets: dict[tuple, list[int]] = {}  # latent shape -> indices of the records of that size
        for i, r in enumerate(records):
            self.buckets.setdefault(tuple(r.x0.shape), []).append(i)
        # the roll-out grid per latent size: a resolution-aware schedule (klein) differs per aspect bucket
        self.sigma_grids = {shape: denoiser.sigma_grid(cfg.k, shape) for shape in self.buckets}
        self.sigmas = self.sigma_grids[tuple(records[0].x0.shape)]  # the first image's, for the metadata
        self.model_id = denoiser.fingerprint()
        self.data_id = run_folder.records_fingerprint(records)
        if self.prior:  # other prior prompts are other training data
            self.data_id += "-prior-" + hashlib.sha256("\n".join(self.prior.captions).encode()).hexdigest()[:8]
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.lora = denoiser.add_lora(cfg.rank, cfg.alpha, seed=cfg.seed, adapter=cfg.adapter, factor=cfg.lokr_factor)
        self.params = self.lora.parameters_list()
        self.opt = build_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay)
        denoiser.set_checkpointing(cfg.checkpointing)
        self.step_den = CompiledDenoiser(denoiser) if cfg.compile else denoiser  # what the objectives call
        self.step, self.history, self.last_saved = 0, [], None
        self._lr = self._grad_norm = self._prior_loss = None  # the last step's, for on_step
        self.init_lora = str(init_lora) if init_lora else None
        self.concepts = concepts_record([c for r in records for c in r.captions], trigger)
        if resume:
            self._resume()
        else:
            if dist.is_main:
                run_folder.check_fresh_out_dir(self.run_dir)
            if init_lora:
                sd, meta = read_lora_file(Path(init_lora))
                self.lora.load_state_dict_comfy(sd, "student", source=f"--init-lora {init_lora}")
                self.lora.copy_student_to_teacher()  # warm start: the teacher starts from the loaded LoRA
                self.lora.copy_student_to_anchor()  # ... and the prior keeps what it could do
                self.concepts = concepts_record(self.concepts[-1]["captions"], trigger, earlier_concepts(meta))
        self.class_latents = self._class_latents() if self.prior and cfg.method == "sft" else None

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        c = self.cfg
        start_step, t0 = self.step, time.perf_counter()
        if self.step == 0 and c.preview_every and self.preview_fn and self.cb.on_preview:
            # step 0: the starting model's samples on the previews' fixed noise, what every later preview is
            # seen against (a drifting unrelated prompt shows at once)
            self.cb.on_preview(0, self.preview_fn(), self.preview_prompts)
        while self.step < c.steps:
            if self.dist.any(bool(self.cb.should_stop and self.cb.should_stop())):  # every rank stops together
                self._save_at_stop()
                raise TrainingCancelled(self.step, self.last_saved)
            with self._saved_if_stopped():  # a stop inside the step: the step before it
                loss = self.train_step()
            with self._saved_if_stopped():
                done = self.step - start_step
                rate = done / max(time.perf_counter() - t0, 1e-9)
                if self.cb.on_step:
                    self.cb.on_step(StepInfo(self.step, c.steps, loss, self._lr, rate, (c.steps - self.step) / rate,
                                             self._grad_norm, self._prior_loss))
            if (c.save_every and self.step % c.save_every == 0) or self.step == c.steps:
                self.save()
            if c.preview_every and self.preview_fn and self.cb.on_preview and (
                    self.step % c.preview_every == 0 or self.step == c.steps):
                with self._saved_if_stopped():
                    self.cb.on_preview(self.step, self.preview_fn(), self.preview_prompts)
        return TrainResult(self.run_dir, self.step, self.history)

    def train_step(self) -> float:
        """One optimizer step. Forwards and backwards may raise anywhere (ComfyUI raises its Cancel from
        inside the next op); such a step leaves no trace: the state it changed before the optimizer step
        is its gradients and the RNG stream, and both are put back. From opt.step() on nothing calls the
        model, so nothing in the host raises there."""
        c = self.cfg
        lr = lr_at(self.step, c.steps, c.lr, c.warmup, c.schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        rng_at_start = self.gen.get_state()
        try:
            self._prior_parts = []
            losses = [self._micro_step(self.draw_batch(), 1.0 / c.grad_accum) for _ in range(c.grad_accum)]
            prior = sum(self._prior_parts) / len(self._prior_parts) if self._prior_parts else None
            loss, prior = self._mean_over_ranks(sum(losses) / len(losses), prior)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                raise NonFiniteLoss(self.step + 1, self.last_saved,
                                    loss if not math.isfinite(loss) else float(grad_norm))
        except BaseException:
            self.opt.zero_grad(set_to_none=True)
            self.gen.set_state(rng_at_start)
            raise
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if c.teacher == "ema":
            self.lora.ema_update(c.ema_decay)
        self.step += 1
        self.history.append(loss)
        self._lr, self._grad_norm, self._prior_loss = lr, float(grad_norm), prior
        return loss

    def _mean_over_ranks(self, loss: float, prior: float | None) -> tuple[float, float | None]:
        """Data parallelism: gradients and the losses become their means over ranks (one all-reduce), so
        every rank steps alike. One process: nothing to do."""
        if self.dist.world == 1:
            return loss, prior
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        losses = torch.tensor([loss, 0.0 if prior is None else prior], dtype=torch.float32)
        self.dist.mean_([p.grad for p in self.params] + [losses])
        return float(losses[0]), None if prior is None else float(losses[1])

    @contextlib.contextmanager
    def _saved_if_stopped(self):
        """Whatever stops the run inside this block keeps the last complete step (a failing save is not
        retried). A non-finite loss does not: its rule is to stop at the last good save."""
        try:
            yield
        except NonFiniteLoss:
            raise
        except BaseException:
            self._save_at_stop()
            raise

    def _save_at_stop(self) -> None:
        if self.step != self.last_saved:
            self.save()

    # --- what a step draws, and its losses ------------------------------------------------------------
    def draw_batch(self) -> Batch:
        """batch_size records of one latent size, one caption variant each, from the training stream: the
        whole global batch is drawn on every rank, which keeps its rows."""
        if len(self.buckets) == 1:
            idx = torch.randint(len(self.records), (self.cfg.batch_size,), generator=self.gen).tolist()
        else:  # aspect buckets: a batch shares one latent size; a bucket is drawn as often as it has images
            first = int(torch.randint(len(self.records), (1,), generator=self.gen))
            bucket = self.buckets[tuple(self.records[first].x0.shape)]
            rest = torch.randint(len(bucket), (self.cfg.batch_size - 1,), generator=self.gen).tolist()
            idx = [first] + [bucket[j] for j in rest]
        variants = [int(torch.randint(len(self.records[i].captions), (1,), generator=self.gen)) for i in idx]
        picked = list(zip(idx, variants))[self.rows]
        xs = [self.records[i].x0 for i, _ in picked]
        cs = [self.records[i].student_ctx[v] for i, v in picked]
        ct = [self.records[i].teacher_ctx[v] for i, v in picked]
        return Batch(torch.stack(xs), self.den.batch_contexts(cs), self.den.batch_contexts(ct), *self._split())

    def _split(self, prior: bool = False) -> tuple[slice | None, int | None]:
        """Batch.rows / global_size of this rank's share (None, None with one process: the stream is the
        single-process one either way)."""
        if self.dist.world == 1:
            return None, None
        return (self.prior_rows, self.cfg.prior_batch) if prior else (self.rows, self.cfg.batch_size)

    def _micro_step(self, batch: Batch, scale: float) -> float:
        c = self.cfg
        shape = tuple(batch.x0.shape[1:])
        # the prior on every prior_every-th step (self.step: the steps done before this one), weighted
        # prior_every times so that on average it pulls as hard as on every step
        with_prior = self.prior is not None and self.step % c.prior_every == 0
        prior_scale = scale * c.prior_weight * c.prior_every
        if c.method == "dopsd":
            sigmas = self.sigma_grids[shape]
            loss = dopsd_backward(self.step_den, batch, sigmas, self.gen, teacher=c.teacher,
                                  loss_weight=c.loss_weight, states=c.states, loss_scale=scale)["loss"]
            if with_prior:  # on-policy prior: the starting model, text only, on the student's own states
                prior = dopsd_backward(self.step_den, self._prior_batch(shape), sigmas, self.gen, teacher="start",
                                       loss_weight=c.loss_weight,
                                       states=c.states if c.prior_states == "same" else c.prior_states,
                                       loss_scale=prior_scale)["loss"]
                self._prior_parts.append(prior)
                loss += c.prior_weight * prior
        else:
            # SFT draws sigma from the model's own training distribution
            shift = getattr(self.den, "train_shift", self.den.shift)
            loss = sft_backward(self.step_den, batch, shift, self.gen, loss_scale=scale)["loss"]
            if with_prior:  # DreamBooth's prior: flow matching on the cached class images
                prior = sft_backward(self.step_den, self._class_batch(), shift, self.gen,
                                     loss_scale=prior_scale)["loss"]
                self._prior_parts.append(prior)
                loss += c.prior_weight * prior
        return loss

    def _prior_batch(self, shape: tuple[int, ...]) -> Batch:
        """prior_batch prompts drawn from the prior; x0 only gives the roll-out its shape."""
        idx = torch.randint(len(self.prior.contexts), (self.cfg.prior_batch,), generator=self.gen).tolist()
        idx = idx[self.prior_rows]
        ctx = self._batch_prior_contexts(idx)
        return Batch(torch.zeros((len(idx), *shape), device=self.records[0].x0.device), ctx, ctx,
                     *self._split(prior=True))

    def _batch_prior_contexts(self, idx: list[int]):
        try:
            return self.den.batch_contexts([self.prior.contexts[i % len(self.prior.contexts)] for i in idx])
        except ValueError:  # e.g. Z-Image: caption contexts differ in length
            raise DopsdError("the prior prompts' contexts differ in length and cannot share a batch; "
                             "set prior_batch (--prior-batch) to 1") from None

    def _class_batch(self) -> Batch:
        idx = torch.randint(len(self.class_latents), (self.cfg.prior_batch,), generator=self.gen).tolist()
        idx = idx[self.prior_rows]
        ctx = self._batch_prior_contexts(idx)
        return Batch(self.class_latents[idx], ctx, ctx, *self._split(prior=True))

    @torch.no_grad()
    def _class_latents(self) -> torch.Tensor:
        """SFT's class images: image i of prompt i mod len(prompts), sampled once by the starting model
        at its few-step setting (K Euler steps), cached in <run>/prior/ and reused on resume."""
        shape, captions = tuple(self.records[0].x0.shape), self.prior.captions
        n = max(len(captions), PRIOR_CLASS_IMAGES)
        key = hashlib.sha256(f"{self.model_id}|{self.init_lora}|{self.cfg.k}|{shape}|{n}|{self.cfg.seed}|"
                             f"{chr(10).join(captions)}".encode()).hexdigest()[:16]
        path = self.run_dir / "prior" / "class_latents.safetensors"
        if path.is_file():
            tensors, meta = load_tensors(path)
            if meta.get("dopsd.key") == key:
                return tensors["latents"].to(self.records[0].x0.device)
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # not the training stream
        sigmas, device = self.den.sigma_grid(self.cfg.k, shape), self.records[0].x0.device
        with self.lora.use("anchor"):  # one at a time: contexts of different lengths do not batch (Z-Image)
            latents = torch.cat([sample(self.den, self.prior.contexts[i % len(captions)], (1, *shape), sigmas, gen,
                                        device=device) for i in range(n)])
        if self.dist.is_main:  # every rank samples the same images; one writes them
            save_tensors({"latents": latents}, path, {"dopsd.key": key, "dopsd.prompts": json.dumps(captions)})
        return latents

    # --- previews ------------------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self) -> torch.Tensor:
        """K-step samples of the preview prompts with the student LoRA, fixed seeds -> [N, H, W, 3]. Needs a
        PromptDenoiser (one that encodes prompts and decodes latents); other models pass a preview_fn."""
        den: PromptDenoiser = self.den
        ctx = den.batch_contexts([den.encode_prompt(p) for p in self.preview_prompts])
        gen = torch.Generator().manual_seed(1234)
        with self.lora.use("student"):
            lat = sample(den, ctx, (len(self.preview_prompts), *den.latent_shape),
                         den.sigma_grid(self.cfg.k, den.latent_shape), gen, device=self.records[0].x0.device)
        return den.decode(lat)

    # --- save and resume: the run folder (run_folder.py) ----------------------------------------------
    def lora_metadata(self) -> dict[str, str]:
        """The safetensors metadata of the student LoRA at the current step (what its saved file carries)."""
        c = self.cfg
        return lora_metadata(self.lora, method=c.method, model_family=self.den.family, steps=str(self.step),
                             sigma_grid=self.sigmas, k=str(c.k), teacher=c.teacher, loss_weight=c.loss_weight,
                             states=c.states, lr=str(c.lr), model_fingerprint=self.model_id,
                             init_lora=self.init_lora or "", version=__version__, step=str(self.step),
                             concepts=self.concepts, prior_weight=str(c.prior_weight),
                             prior_prompts=len(self.prior.captions) if self.prior else 0)

    def save(self) -> None:
        """The current step as the run folder's newest generation (run_folder.save: the tensors, then the
        commit, then the cleanup), then the loss files. Data parallelism: rank 0 writes, every rank counts it."""
        if not self.dist.is_main:
            self.last_saved = self.step
            return
        run_folder.save(
            self.run_dir, self.step, self.lora, self.lora_metadata(), self.opt, self.gen,
            anchor=bool(self.init_lora),  # the prior's teacher after a warm start (a fresh run's is its init)
            config=self.cfg.to_dict(), model_family=self.den.family, model_fingerprint=self.model_id,
            data_fingerprint=self.data_id, sigma_grid=self.sigmas, history=self.history, init_lora=self.init_lora,
            data_dir=self.data_dir, concepts=self.concepts, prior_prompts=self.prior.captions if self.prior else None)
        self.last_saved = self.step
        write_loss_files(self.history, self.run_dir, title=f"{self.cfg.method} {self.den.family}")
        if self.cb.on_save:
            self.cb.on_save(self.step, self.run_dir)

    def _resume(self) -> None:
        """Continue the run folder (run_folder.load refuses another model, data or config)."""
        st = run_folder.load(self.run_dir, self.lora, self.opt, self.gen, model_family=self.den.family,
                             model_fingerprint=self.model_id, data_fingerprint=self.data_id,
                             config=self.cfg.to_dict(), resumable=TrainConfig.RESUMABLE_CHANGES,
                             defaults=TrainConfig().to_dict())
        self.concepts = st.get("concepts", self.concepts)
        self.step, self.history, self.last_saved = st["step"], list(st["history"]), st["step"]
        self.init_lora = st.get("init_lora")

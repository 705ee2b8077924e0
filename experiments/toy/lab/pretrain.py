"""Training the toy turbo model in two resumable stages.

Stage a, `pretrain`: rectified flow on rendered scenes of the seen shapes. Part of every batch carries
a reference image in context (mostly the target itself, sometimes the same shape in another layout);
those captions often name the shape only by a concept token [V]..[V8], and some copies show random
unnamed outlines ("blobs"): the model learns "draw what the reference shows", which is what the
D-OPSD teacher relies on for shapes it never saw. A tenth of the plain captions are empty, for
classifier-free guidance. Since run 9, part of the plain captions name a concept token alone, and the
target is that token's own outline (render.TOKEN_OUTLINE): each token means something of its own, and a
reference overrides it.

Stage b, `distill`: trajectory distillation into a 4-step sampler. The pretrained (EMA) model,
with classifier-free guidance, samples 16-step Euler trajectories on ComfyUI's `simple` grid (shift 3),
whose every 4th state is a state of the 4-step grid 1, .9, .75, .5, 0; the student learns each 4-step
jump as one step, without guidance, for plain and reference-conditioned prompts alike. From
`copy_from` on, every step also learns copies straight from the data (`_copy_loss`): with the target in
context there is one right answer, and the parent's own copies lose the star's thin points.

Both stages write a checkpoint folder (safetensors + JSON) every `save_every` steps and resume from
it; the finished models are written with `save_toy`.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd_core.denoiser import euler_step
from dopsd_core.errors import DopsdError
from dopsd_core.fileio import load_tensors, save_json, save_tensors
from dopsd_core.optim import optimizer_state_from_tensors, optimizer_state_to_tensors
from dopsd_core.run_folder import decode_rng, encode_rng
from dopsd_core.schedule import comfy_simple_sigmas, logit_normal_sigmas
from dopsd_core.toy.denoiser import (EMPTY_CAPTION, SHIFT, TRAIN_SHIFT, Guided, ToyContext, ToyDenoiser, image_to_latent,
                       load_toy_file, save_toy)
from dopsd_core.toy.model import ToyConfig, ToyDiT
from dopsd_core.toy.render import TOKEN_OUTLINE, Scene, caption_variants, random_blob_scene, random_scene, render
from dopsd_core.toy.text import CONCEPT_TOKENS, ToyTextEncoder, tokenize


# Training sigma distribution: half logit-normal with shift TRAIN_SHIFT, half uniform (which keeps
# low sigma covered). Runs 1-6 used shift 1; by run 5 one-shot denoising was right at sigma <= 0.3
# (100 % shape accuracy) but only 60 % at 0.75, where the 4-step grid (1, .9, .75, .5) decides the
# shape, so run 7 moved the logit-normal half to the sampling shift 3 (median sigma 0.75):
# denoiser.TRAIN_SHIFT, which SFT on the toy reuses.
UNIFORM_FRAC = 0.5


def train_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    sigma = logit_normal_sigmas(n, TRAIN_SHIFT, gen)
    uniform = torch.rand(n, generator=gen).clamp(min=1e-3)
    return torch.where(torch.rand(n, generator=gen) < UNIFORM_FRAC, uniform, sigma)

# Reference examples (ref_frac of each batch): the reference is the target itself (what the D-OPSD
# teacher sees) for COPY_PROB of them, else the same shape in another layout. BLOB_PROB of the copies
# show a random unnamed outline (render.random_blob_scene) with a concept-token caption: with only six
# seen shapes, a small model learned "recognise which of six, draw that" instead of copying, and drew
# held-out shapes as the nearest seen one (17 % copy accuracy after 6000 steps, run 4).
COPY_PROB = 0.8
BLOB_PROB = 0.4
# Share of plain examples trained with an empty caption: the unconditional branch that classifier-free
# guidance needs. The many-step base is sampled with guidance and distillation bakes it into the 4-step
# student, which then samples without it (as the real turbo models are guidance-distilled).
DROP_PROB = 0.1
# Share of captioned plain examples that show a concept token's own outline (render.TOKEN_OUTLINE) under
# that token, from run 9 on: it gives every token an identity of its own.
NAMED_PROB = 0.3
PROBE_GUIDANCE = 3.0
EMPTY_TOKENS = tokenize(EMPTY_CAPTION)


@dataclass
class Example:
    target: torch.Tensor  # [3, 32, 32] latent
    tokens: list[int]
    ref: torch.Tensor | None


def make_example(rng: random.Random, ref_prob: float) -> Example:
    if rng.random() >= ref_prob:
        if rng.random() < DROP_PROB:
            return Example(image_to_latent(render(random_scene(rng))), tokenize(EMPTY_CAPTION), None)
        if rng.random() < NAMED_PROB:
            token = rng.choice(CONCEPT_TOKENS)
            scene = random_scene(rng, TOKEN_OUTLINE[token])
            return Example(image_to_latent(render(scene)), tokenize(rng.choice(caption_variants(scene, token))), None)
        scene = random_scene(rng)
        return Example(image_to_latent(render(scene)), tokenize(rng.choice(caption_variants(scene))), None)
    if rng.random() < COPY_PROB:
        return make_copy_example(rng)
    # same shape, another layout / background, often another colour
    scene = random_scene(rng)
    ref_scene = random_scene(rng, scene.shape, scene.colour if rng.random() < 0.5 else None)
    return _with_caption(rng, scene, image_to_latent(render(ref_scene)))


def make_copy_example(rng: random.Random) -> Example:
    """The reference is the target itself (what the D-OPSD teacher sees): a seen shape or a blob."""
    scene = random_blob_scene(rng) if rng.random() < BLOB_PROB else random_scene(rng)
    target = image_to_latent(render(scene))
    return _with_caption(rng, scene, target, target)


def _with_caption(rng: random.Random, scene: Scene, ref: torch.Tensor, target: torch.Tensor | None = None) -> Example:
    named = not scene.shape.startswith("blob:") and rng.random() < 0.5
    word = None if named else rng.choice(CONCEPT_TOKENS)
    return Example(image_to_latent(render(scene)) if target is None else target,
                   tokenize(rng.choice(caption_variants(scene, word))), ref)


def _collate(examples: list[Example]):
    x0 = torch.stack([e.target for e in examples])
    ids = torch.tensor([e.tokens for e in examples])
    ref = None if examples[0].ref is None else torch.stack([e.ref for e in examples])
    return x0, ids, ref


class _Checkpoint:
    """Module weights + EMA + optimizer + RNG + step in one folder (atomic files, no pickle)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "progress.json").is_file()

    def save(self, modules: dict, opt, step: int, rngs: dict, extra: dict) -> None:
        sd = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        tag = {"step": str(step)}
        save_tensors(sd, self.folder / "weights.safetensors", tag)
        opt_t, opt_extra = optimizer_state_to_tensors(opt)
        save_tensors(opt_t, self.folder / "optimizer.safetensors", tag)
        save_json({"step": step, "optimizer": opt_extra, "rng": rngs, **extra}, self.folder / "progress.json")

    def load(self, modules: dict, opt) -> dict:
        import json
        progress = json.loads((self.folder / "progress.json").read_text())
        sd, meta = load_tensors(self.folder / "weights.safetensors")
        if meta.get("step") != str(progress["step"]):
            raise RuntimeError(f"checkpoint {self.folder} was interrupted during a save")
        for name, m in modules.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
        opt_t, _ = load_tensors(self.folder / "optimizer.safetensors")
        optimizer_state_from_tensors(opt, opt_t, progress["optimizer"])
        return progress


def _progress(stage: str, step: int, total: int, loss: float, t0: float, start: int) -> None:
    rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    print(f"[{stage}] {step}/{total} loss {loss:.4f} {rate:.2f} it/s ETA {eta / 60:.1f} min", flush=True)


@torch.no_grad()
def _ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def pretrain(work: Path, steps: int = 8000, batch: int = 32, ref_frac: float = 0.4, lr: float = 6e-4,
             warmup: int = 500, ema_decay: float = 0.999, save_every: int = 250, log_every: int = 50,
             probe_every: int = 1000, seed: int = 0, cfg: ToyConfig = ToyConfig(), device: str = "cpu",
             init: Path | None = None) -> Path:
    """Stage a. Returns the path of the EMA model (work/pretrained.safetensors). init: another run's
    checkpoint folder whose live weights start this run (fresh optimizer, step 0), e.g. to change
    cfg.prediction without starting from random weights."""
    work = Path(work)
    ckpt = _Checkpoint(work / "pretrain_ckpt")
    torch.manual_seed(seed)
    dit, te = ToyDiT(cfg).to(device), ToyTextEncoder(cfg.context_dim, cfg.text_depth).to(device)
    ema_dit, ema_te = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    modules = {"dit": dit, "te": te, "ema_dit": ema_dit, "ema_te": ema_te}
    step, rng, gen = 0, random.Random(seed), torch.Generator().manual_seed(seed)
    if init is not None and not ckpt.exists():
        sd, _ = load_tensors(Path(init) / "weights.safetensors")
        for name, m in (("dit", dit), ("te", te), ("ema_dit", ema_dit), ("ema_te", ema_te)):
            src = name.removeprefix("ema_")  # the EMA starts from the live weights
            m.load_state_dict({k[len(src) + 1:]: v for k, v in sd.items() if k.startswith(src + ".")})
        print(f"[pretrain] starting from the weights of {init}", flush=True)
    if ckpt.exists():
        progress = ckpt.load(modules, opt)
        step = progress["step"]
        rng.setstate(_tuple(progress["rng"]["python"]))
        gen.set_state(decode_rng(progress["rng"]["torch"]))
        print(f"[pretrain] resuming at step {step}/{steps}", flush=True)
    n_ref = round(batch * ref_frac)
    t0, start, losses = time.perf_counter(), step, []
    while step < steps:
        for g in opt.param_groups:
            # linear warm-up, then cosine decay to 10% of lr
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss = 0.0
        for n, ref_prob in ((batch - n_ref, 0.0), (n_ref, 1.0)):
            x0, ids, ref = _collate([make_example(rng, ref_prob) for _ in range(n)])
            sigma = train_sigmas(n, gen)
            eps = torch.randn(x0.shape, generator=gen)  # drawn on the CPU: the run is the same on any device
            x0, ids, sigma, eps = x0.to(device), ids.to(device), sigma.to(device), eps.to(device)
            ref = None if ref is None else ref.to(device)
            s4 = sigma.view(-1, 1, 1, 1)
            x_t = (1 - s4) * x0 + s4 * eps
            v = dit(x_t, sigma, te(ids), ref_latents=ref)
            part = F.mse_loss(v, eps - x0) * n / batch
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ema(ema_dit, dit, ema_decay)
        _ema(ema_te, te, ema_decay)
        step += 1
        losses.append(loss)
        if step % log_every == 0 or step == steps:
            _progress("pretrain", step, steps, sum(losses[-log_every:]) / len(losses[-log_every:]), t0, start)
        if step % save_every == 0 or step == steps:
            ckpt.save(modules, opt, step, {"python": _list(rng.getstate()), "torch": encode_rng(gen)},
                      {"total": steps})
        if probe_every and step % probe_every == 0:
            ema_cpu = _cpu_copy(ema_dit, ema_te)
            for w in (1.0, PROBE_GUIDANCE):
                print(f"[pretrain] probe at {step}, guidance {w}: {json.dumps(probe(ema_cpu, guidance=w))}", flush=True)
    out = work / "pretrained.safetensors"
    save_toy(_cpu_copy(ema_dit, ema_te), out, stage="pretrained", steps=steps)
    return out


@torch.no_grad()
def probe(den: ToyDenoiser, n: int = 48, steps: int = 16, guidance: float = 1.0) -> dict:
    """Progress of a base model in the acceptance's terms, cheap enough to run during training:
    evaluator accuracies of `steps`-step samples of seen prompts (shape; shape+colour) and of held-out
    shapes drawn with the target itself in context (the D-OPSD teacher's task)."""
    from dopsd_core.toy.evaluator import load_evaluator
    from dopsd_core.toy.metrics import generate, unrelated_prompts
    from dopsd_core.toy.render import CONCEPT_TOKEN, HELD_OUT_SHAPES, concept_scenes
    ev = load_evaluator()
    prompts = unrelated_prompts(n, seed=7)
    shapes, colours = ev.classify(generate(den, [p for p, *_ in prompts], steps, seed=7, guidance=guidance))
    shape_acc = sum(s == p[1] for s, p in zip(shapes, prompts)) / n
    joint_acc = sum(s == p[1] and c == p[2] for s, c, p in zip(shapes, colours, prompts)) / n
    scenes = [sc for shape in HELD_OUT_SHAPES for sc in concept_scenes(shape, 8, seed=3)]
    refs = torch.stack([image_to_latent(render(sc)) for sc in scenes])
    caps = [caption_variants(sc, CONCEPT_TOKEN[sc.shape])[1] for sc in scenes]
    got, _ = ev.classify(generate(den, caps, steps, seed=8, refs=refs, guidance=guidance))
    copy_acc = sum(g == sc.shape for g, sc in zip(got, scenes)) / len(scenes)
    return {"shape_acc": round(shape_acc, 3), "joint_acc": round(joint_acc, 3), "ref_copy_acc": round(copy_acc, 3)}


def _cpu_copy(dit: ToyDiT, te: ToyTextEncoder) -> ToyDenoiser:
    return ToyDenoiser(copy.deepcopy(dit).cpu(), copy.deepcopy(te).cpu())


def _list(state):  # random.getstate() -> JSON-able
    return [state[0], list(state[1]), state[2]]


def _tuple(state):
    return (state[0], tuple(state[1]), state[2])


@torch.no_grad()
def make_trajectories(teacher: ToyDenoiser, n: int, ref_frac: float, seed: int, guidance: float = 1.0,
                      fine_steps: int = 16, coarse_steps: int = 4, batch: int = 64) -> dict[str, torch.Tensor]:
    """Teacher Euler trajectories (classifier-free guidance `guidance`) on the fine grid; keeps the
    states on the coarse grid.
    Returns states [n, coarse+1, 3, 32, 32], token ids [n, L], refs [n, 3, 32, 32] and has_ref [n]."""
    fine = comfy_simple_sigmas(SHIFT, fine_steps)
    coarse = comfy_simple_sigmas(SHIFT, coarse_steps)
    stride = fine_steps // coarse_steps
    assert all(abs(fine[i * stride] - coarse[i]) < 1e-6 for i in range(coarse_steps + 1)), "coarse grid not on fine grid"
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    guided = Guided(teacher, guidance)
    states, ids_all, refs, has_ref = [], [], [], []
    n_ref = round(n * ref_frac)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        with_ref = start >= n - n_ref
        ex = []
        while len(ex) < m:  # captioned prompts only (blob copies included: they keep the copy general)
            e = make_example(rng, 1.0 if with_ref else 0.0)
            if e.tokens != EMPTY_TOKENS:
                ex.append(e)
        _, ids, ref = _collate(ex)
        dev = teacher.device
        ctx = ToyContext(teacher.text_encoder(ids.to(dev)), None if ref is None else ref.to(dev))
        x = torch.randn((m, 3, 32, 32), generator=gen).to(dev)
        kept = [x]
        for i in range(fine_steps):
            s = torch.full((m,), fine[i], device=dev)
            x = euler_step(x, guided.denoise(x, s, ctx), fine[i], fine[i + 1])
            if (i + 1) % stride == 0:
                kept.append(x)
        states.append(torch.stack(kept, 1).cpu())
        ids_all.append(ids)
        refs.append(ref if ref is not None else torch.zeros(m, 3, 32, 32))
        has_ref.append(torch.full((m,), with_ref))
        print(f"[distill] trajectories {start + m}/{n}", flush=True)
    return {"states": torch.cat(states), "ids": torch.cat(ids_all), "refs": torch.cat(refs),
            "has_ref": torch.cat(has_ref)}


def _copy_loss(student: ToyDenoiser, n: int, coarse: list[float], rng: random.Random,
               gen: torch.Generator, device: str) -> torch.Tensor:
    """Copy examples on the 4-step grid, supervised by the data itself. The reference is the target,
    so the target is the one right answer at every state: a student that copies exactly visits
    x_t = (1 - sigma) * x0 + sigma * noise at the grid's sigmas, and its x0 prediction there must be x0.
    The guided parent's trajectories only teach its own copy, which loses thin points (run 7)."""
    x0, ids, ref = _collate([make_copy_example(rng) for _ in range(n)])
    x0, ref = x0.to(device), ref.to(device)
    k = torch.randint(4, (n,), generator=gen)
    sigma = torch.tensor([coarse[i] for i in k.tolist()], device=device)
    s4 = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s4) * x0 + s4 * torch.randn(x0.shape, generator=gen).to(device)
    with torch.no_grad():
        text = student.text_encoder(ids.to(device))
    return F.mse_loss(student.denoise(x_t, sigma, ToyContext(text, ref)), x0)


def distill(work: Path, steps: int = 1500, batch: int = 32, n_traj: int = 3000, ref_frac: float = 0.35,
            lr: float = 1e-4, guidance: float = 3.0, fine_steps: int = 16, save_every: int = 250,
            log_every: int = 50, probe_every: int = 500, seed: int = 1, device: str = "cpu",
            copy_batch: int = 0, copy_from: int = 0) -> Path:
    """Stage b. Returns the path of the distilled 4-step model (work/distilled.safetensors).
    copy_batch > 0 adds that many data-supervised copy examples (`_copy_loss`) to every step from
    step `copy_from` on (so a finished distillation can be continued with them)."""
    work = Path(work)
    teacher = load_toy_file(work / "pretrained.safetensors", device)
    traj_file = work / "trajectories.safetensors"
    parent = teacher.fingerprint()  # trajectories and a half-done student belong to one parent model
    settings = {"n_traj": str(n_traj), "guidance": f"{guidance:g}", "ref_frac": f"{ref_frac:g}", "seed": str(seed),
                "fine_steps": str(fine_steps), "parent": parent}
    if traj_file.is_file():
        traj, meta = load_tensors(traj_file)
        if {k: meta.get(k) for k in settings} != settings:
            raise DopsdError(f"{traj_file} was made with other settings ({meta}); delete it, or the work folder's "
                             f"distill_ckpt too, to distil with {settings}")
    else:
        traj = make_trajectories(teacher, n_traj, ref_frac, seed, guidance, fine_steps)
        save_tensors(traj, traj_file, settings)
    coarse = comfy_simple_sigmas(SHIFT, 4)
    student = load_toy_file(work / "pretrained.safetensors", device)
    dit = student.dit.requires_grad_(True).train()  # the text encoder stays as pretrained
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    ckpt = _Checkpoint(work / "distill_ckpt")
    step, gen = 0, torch.Generator().manual_seed(seed)
    if ckpt.exists():
        progress = ckpt.load({"dit": dit}, opt)
        if progress.get("parent") != parent:
            raise DopsdError(f"{ckpt.folder} distils another pretrained model; delete it (and "
                             f"{traj_file.name}) to distil {work / 'pretrained.safetensors'}")
        step = progress["step"]
        gen.set_state(decode_rng(progress["rng"]["torch"]))
        for group in opt.param_groups:  # a continued run may anneal: the lr passed now applies from here
            group["lr"] = lr
        print(f"[distill] resuming at step {step}/{steps} (lr {lr:g})", flush=True)
    n = traj["states"].shape[0]
    t0, start, losses = time.perf_counter(), step, []
    while step < steps:
        loss = 0.0
        idx = torch.randint(n, (batch,), generator=gen)
        for use_ref in (False, True):
            sel = idx[traj["has_ref"][idx] == use_ref]
            if len(sel) == 0:
                continue
            k = torch.randint(4, (len(sel),), generator=gen)
            x = traj["states"][sel, k].to(device)
            x_next = traj["states"][sel, k + 1].to(device)
            sigma = torch.tensor([coarse[i] for i in k.tolist()])
            sigma_next = torch.tensor([coarse[i + 1] for i in k.tolist()])
            sigma, sigma_next = sigma.to(device), sigma_next.to(device)
            ratio = (sigma_next / sigma).view(-1, 1, 1, 1)
            x0_target = (x_next - ratio * x) / (1 - ratio)  # the x0 whose Euler step lands on x_next
            with torch.no_grad():
                text = student.text_encoder(traj["ids"][sel].to(device))
            ref = traj["refs"][sel].to(device) if use_ref else None
            x0_hat = student.denoise(x, sigma, ToyContext(text, ref))
            part = F.mse_loss(x0_hat, x0_target) * len(sel) / batch
            part.backward()
            loss += part.item()
        if copy_batch and step >= copy_from:
            # its own seeded stream per step, so a resumed run draws the same examples
            part = _copy_loss(student, copy_batch, coarse, random.Random(f"copy-{seed}-{step}"), gen, device)
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss)
        if step % log_every == 0 or step == steps:
            _progress("distill", step, steps, sum(losses[-log_every:]) / len(losses[-log_every:]), t0, start)
        if step % save_every == 0 or step == steps:
            ckpt.save({"dit": dit}, opt, step, {"torch": encode_rng(gen)}, {"total": steps, "parent": parent})
        if probe_every and step % probe_every == 0:
            dit.eval()
            print(f"[distill] 4-step probe at {step}: {json.dumps(probe(_cpu_copy(dit, student.text_encoder), steps=4))}",
                  flush=True)
            dit.train().requires_grad_(True)
    out = work / "distilled.safetensors"
    save_toy(_cpu_copy(dit.eval().requires_grad_(False), student.text_encoder), out, stage="distilled-4step",
             steps=steps, guidance=guidance, copy_batch=copy_batch, copy_from=copy_from, last_lr=lr)
    return out

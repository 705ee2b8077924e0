"""Run folders: what a run leaves on disk, how a save commits it, how a resume reads it back.

Layout (docs/method.md, "Run folders"):
  lora.safetensors              the latest save's student LoRA, ComfyUI layout + metadata (what users load)
  lora-NNNNNN.safetensors       the student LoRA of every save point, kept
  state/state.json              the commit record, replaced atomically and written last: step, RNG state,
                                config, fingerprints, loss history, and which generation holds the tensors
  state/step-NNNNNN/            one save's tensors: lora, teacher (EMA) and optimizer .safetensors
                                (+ anchor: the prior's teacher after a warm start)
  loss.csv, loss.png            written by the trainer after each save
A save writes a new generation folder, then commits it by replacing state.json, then removes the older
ones: a process killed at any point leaves state.json naming a complete generation. Everything is
safetensors or JSON; nothing is pickled.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import torch

from .denoiser import Record
from .errors import DopsdError
from .fileio import link_file, load_tensors, save_json, save_tensors
from .lora import LoraSet
from .optim import optimizer_state_from_tensors, optimizer_state_to_tensors

STATE_VERSION = 2  # 2: tensors in a generation folder named by state.json (1: beside it)


def records_fingerprint(records: list[Record]) -> str:
    """Identifies the training data (names, captions, latents); a run folder only resumes on the same data."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.name.encode())
        h.update("\n".join(r.captions).encode())
        h.update(r.x0.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def generation_name(step: int) -> str:
    return f"step-{step:06d}"


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "state" / "state.json").is_file()


def read_run_state(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not is_run_folder(run_dir):
        raise DopsdError(f"{run_dir} is not a run folder (no state/state.json); pass the --out folder of an "
                         "earlier `dopsd train` run")
    try:
        return json.loads((run_dir / "state" / "state.json").read_text())
    except json.JSONDecodeError:
        raise DopsdError(f"{run_dir}/state/state.json is corrupt; start a new run") from None


def encode_rng(gen: torch.Generator) -> str:
    """A torch.Generator's state as text (JSON-safe)."""
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def decode_rng(text: str) -> torch.Tensor:
    """encode_rng's text -> the state tensor for torch.Generator.set_state."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def refuse_taken_out_dir(run_dir: Path) -> None:
    """A new run's folder must not be a file or hold another run (checked without writing anything)."""
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise DopsdError(f"output path {d} is a file; pass a folder for --out")
    if is_run_folder(d):
        raise DopsdError(f"{d} already holds a run; pass --resume {d} to continue it or choose a new --out")


def check_fresh_out_dir(run_dir: Path) -> None:
    """A new run's folder: absent, empty or unrelated, but writable and not holding another run."""
    d = Path(run_dir)
    refuse_taken_out_dir(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DopsdError(f"cannot write to output folder {d} ({e.strerror}); choose a writable --out") from None


def save(run_dir: Path, step: int, lora: LoraSet, lora_metadata: dict[str, str], optimizer: torch.optim.Optimizer,
         rng: torch.Generator, *, anchor: bool, config: dict, model_family: str, model_fingerprint: str,
         data_fingerprint: str, sigma_grid: list[float], history: list[float], init_lora: str | None,
         data_dir: str | None, concepts: list[dict], prior_prompts: list[str] | None) -> None:
    """One generation: tensors into state/step-NNNNNN/, then the commit (state.json), then the user's LoRA
    names and the cleanup of older generations. anchor: also save the LoRA's anchor (a warm start's prior
    teacher; a fresh run's anchor is its init, B = 0)."""
    d, tag = Path(run_dir), {"dopsd.step": str(step)}
    gen = d / "state" / generation_name(step)
    if gen.exists():  # left by a save that was killed before its commit; state.json does not name it
        shutil.rmtree(gen)
    save_tensors(lora.state_dict_comfy("student"), gen / "lora.safetensors", lora_metadata)
    save_tensors(lora.state_dict_comfy("teacher"), gen / "teacher.safetensors", tag)
    opt_tensors, opt_extra = optimizer_state_to_tensors(optimizer)
    save_tensors(opt_tensors, gen / "optimizer.safetensors", tag)
    if anchor:
        save_tensors(lora.state_dict_comfy("anchor"), gen / "anchor.safetensors", tag)
    save_json({
        "version": STATE_VERSION, "step": step, "generation": gen.name, "config": config,
        "model_family": model_family, "model_fingerprint": model_fingerprint, "data_fingerprint": data_fingerprint,
        "sigma_grid": sigma_grid, "rng": encode_rng(rng), "optimizer": opt_extra,
        "history": history, "init_lora": init_lora, "data_dir": data_dir,
        "concepts": concepts, "prior_prompts": prior_prompts,
    }, d / "state" / "state.json")
    # the user's names of the committed LoRA: the latest, and one per save point (kohya's
    # save_every_n_steps; fidelity often saturates before the end). Links, not second writes.
    link_file(gen / "lora.safetensors", d / f"lora-{step:06d}.safetensors")
    link_file(gen / "lora.safetensors", d / "lora.safetensors")
    for old in (d / "state").glob("step-*"):
        if old.name != gen.name:
            shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path, lora: LoraSet, optimizer: torch.optim.Optimizer, rng: torch.Generator, *,
         model_family: str, model_fingerprint: str, data_fingerprint: str, config: dict,
         resumable: tuple[str, ...], defaults: dict | None = None) -> dict:
    """Resume: refuse a run folder made for another model, data or config (all but the `resumable`
    fields), or one already past config["steps"]; load its LoRA (student, teacher, anchor), optimizer and
    RNG state into lora, optimizer and rng. Returns state.json's record (step, history, concepts, ...)."""
    d = Path(run_dir)
    st = read_run_state(d)
    if st.get("model_family") != model_family or st.get("model_fingerprint") != model_fingerprint:
        raise DopsdError(f"run folder {d} was trained on model {st.get('model_family')} "
                         f"({st.get('model_fingerprint')}), not this one ({model_family}, {model_fingerprint}); "
                         "resume with the same model or start a new --out")
    if st.get("data_fingerprint") != data_fingerprint:
        raise DopsdError(f"run folder {d} was trained on other data; resume with the same --data or start a new --out")
    saved = {**(defaults or {}), **st["config"]}  # a field newer than the run folder has its default there
    now = config
    diffs = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now
             if k not in resumable and saved.get(k) != now[k]]
    if diffs:
        raise DopsdError(f"run folder {d} used another training config: {', '.join(diffs)}; "
                         "resume with the same settings or start a new --out")
    if config["steps"] < st["step"]:
        raise DopsdError(f"run folder {d} is already at step {st['step']}; pass --steps >= {st['step']} "
                         "(equal: its LoRA as saved)")
    if st.get("generation"):
        gen = d / "state" / st["generation"]
        files = {"lora.safetensors": gen / "lora.safetensors", "teacher": gen / "teacher.safetensors",
                 "optimizer": gen / "optimizer.safetensors"}
    else:  # version 1: the tensors beside state.json
        files = {"lora.safetensors": d / "lora.safetensors", "teacher": d / "state" / "teacher.safetensors",
                 "optimizer": d / "state" / "optimizer.safetensors"}
    loaded = {}
    for label, path in files.items():
        if not path.is_file():
            raise DopsdError(f"run folder {d} is incomplete ({path.name} missing); start a new --out")
        loaded[label] = load_tensors(path)
        if loaded[label][1].get("dopsd.step") != str(st["step"]):
            raise DopsdError(f"run folder {d} was interrupted during a save ({path.name} is from step "
                             f"{loaded[label][1].get('dopsd.step')}, state.json from {st['step']}); start a new --out")
    lora.load_state_dict_comfy(loaded["lora.safetensors"][0], "student", source=str(files["lora.safetensors"]))
    lora.load_state_dict_comfy(loaded["teacher"][0], "teacher", source=str(files["teacher"]))
    optimizer_state_from_tensors(optimizer, loaded["optimizer"][0], st["optimizer"])
    if st.get("generation") and (d / "state" / st["generation"] / "anchor.safetensors").is_file():
        anchor = load_tensors(d / "state" / st["generation"] / "anchor.safetensors")[0]
        lora.load_state_dict_comfy(anchor, "anchor", source=f"{d} anchor")
    rng.set_state(decode_rng(st["rng"]))
    return st

"""What the lab's runs add to dopsd_core.toy.runs (which trains a toy concept for `dopsd demo`): the
earlier budget that the first experiment and the probes run at, and loading a trained LoRA onto the base."""
from __future__ import annotations

from pathlib import Path

from dopsd_core.lora import lora_file_spec, read_lora_file
from dopsd_core.toy.denoiser import BASE_WEIGHTS, ToyDenoiser, load_toy_file

# The earlier default (lr 1e-3, 200 steps): the first experiment (experiment.py) and the probes run at it,
# so their committed results reproduce.
MAIN_BUDGET = dict(steps=200, rank=16, alpha=16.0, lr=1e-3, batch_size=4)


def load_with_lora(lora_file: Path, base: Path = BASE_WEIGHTS) -> ToyDenoiser:
    den = load_toy_file(base)
    sd, meta = read_lora_file(lora_file)
    spec = lora_file_spec(meta, sd)
    den.add_lora(spec["rank"], spec["alpha"], adapter=spec["adapter"], factor=spec["factor"]).load_state_dict_comfy(sd)
    return den

"""The family spec (dopsd_core/family_spec.py) and what reads it without ComfyUI: the trainer nodes'
config merging (presets, 0 = the family's value), the CLI's defaults, and the generated tables."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dopsd_core.errors import DopsdError
from dopsd_core.family_spec import (DEFAULT_PRESET, FAMILY_DEFAULT, FLUX2_KLEIN, NAMES, PRESET_LABELS, SPECS, TOY,
                                    Z_IMAGE, node_config, spec_named)
from dopsd_core.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
NODE_VALUES = dict(method="dopsd", steps=0, rank=0, lr=0.0, optimizer="adamw", batch_size=0, grad_accum=0, seed=0,
                   checkpointing=False, save_every=100, preview_every=50, k=4, teacher="ema", ema_decay=0.9999,
                   loss_weight="x0", states=FAMILY_DEFAULT, prior_weight=1.0, prior_batch=0, prior_every=0,
                   prior_states=FAMILY_DEFAULT)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_zero_inputs_take_the_family_defaults(spec):
    cfg = TrainConfig(**node_config(spec, DEFAULT_PRESET, NODE_VALUES)).validate()
    assert (cfg.steps, cfg.rank, cfg.alpha, cfg.lr) == (spec.steps, spec.rank, spec.alpha, spec.lr)
    assert (cfg.batch_size, cfg.grad_accum, cfg.prior_batch, cfg.k) == (spec.batch_size, spec.grad_accum,
                                                                         spec.prior_batch, spec.k)


def test_explicit_inputs_win_and_an_explicit_rank_sets_alpha():
    cfg = node_config(FLUX2_KLEIN, DEFAULT_PRESET, {**NODE_VALUES, "steps": 50, "rank": 8, "lr": 1e-3,
                                                    "batch_size": 2, "grad_accum": 1, "prior_batch": 3})
    assert (cfg["steps"], cfg["rank"], cfg["alpha"], cfg["lr"]) == (50, 8, 8.0, 1e-3)
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["prior_batch"]) == (2, 1, 3)


def test_the_cost_levers_come_from_the_family_for_d_opsd_only():
    # a family whose D-OPSD defaults cut the cost (as a toy pick may): the trainer node's "family default"
    # and 0 take them, an explicit input wins, and the SFT trainer keeps every state and the prior on every step
    cheap = dataclasses.replace(TOY, states="one", prior_every=4, prior_states="one")
    cfg = TrainConfig(**node_config(cheap, DEFAULT_PRESET, NODE_VALUES)).validate()
    assert (cfg.states, cfg.prior_every, cfg.prior_states) == ("one", 4, "one")
    cfg = node_config(cheap, DEFAULT_PRESET, {**NODE_VALUES, "states": "two", "prior_every": 2, "prior_states": "same"})
    assert (cfg["states"], cfg["prior_every"], cfg["prior_states"]) == ("two", 2, "same")
    sft = {k: v for k, v in NODE_VALUES.items() if k not in ("states", "prior_every", "prior_states", "k")}
    cfg = TrainConfig(**node_config(cheap, DEFAULT_PRESET, {**sft, "method": "sft"})).validate()
    assert (cfg.states, cfg.prior_every, cfg.prior_states) == ("all", 1, "same")
    assert "prior_every" not in cheap.train_defaults("sft") and cheap.train_defaults()["prior_every"] == 4


def test_a_gpu_preset_overrides_the_defaults_and_the_optimizer_but_not_an_explicit_rank():
    label = FLUX2_KLEIN.gpu_presets[0].label
    cfg = node_config(FLUX2_KLEIN, label, NODE_VALUES)
    assert (cfg["rank"], cfg["alpha"], cfg["optimizer"], cfg["checkpointing"]) == (16, 32.0, "adamw8bit", True)
    assert cfg["lr"] == FLUX2_KLEIN.lr and cfg["steps"] == FLUX2_KLEIN.steps
    cfg = node_config(FLUX2_KLEIN, label, {**NODE_VALUES, "rank": 4})
    assert (cfg["rank"], cfg["alpha"], cfg["optimizer"]) == (4, 4.0, "adamw8bit")


def test_a_preset_the_family_does_not_have_is_refused_with_the_ones_it_has():
    with pytest.raises(DopsdError, match="family default"):
        node_config(TOY, FLUX2_KLEIN.gpu_presets[0].label, NODE_VALUES)
    with pytest.raises(DopsdError, match="12 GB"):
        Z_IMAGE.preset("8 GB")
    assert set(PRESET_LABELS) == {DEFAULT_PRESET} | {p.label for s in SPECS for p in s.gpu_presets}


def test_names_and_lookup():
    assert NAMES == ("toy", "flux2-klein", "z-image") and spec_named("z-image") is Z_IMAGE
    with pytest.raises(DopsdError, match="supported: toy, flux2-klein, z-image"):
        spec_named("sdxl")


def test_every_default_says_where_it_comes_from():
    for spec in SPECS:
        assert {"lr", "rank", "steps", "batch", "prior"} <= set(spec.sources), spec.name


def test_the_cli_and_the_host_families_read_the_spec():
    from dopsd_core import cli
    from dopsd_core.hosts.families import FAMILIES
    assert cli.train_defaults("toy") == TOY.train_defaults()
    assert cli.train_defaults("z-image", "sft") == Z_IMAGE.train_defaults("sft")
    for fam in FAMILIES:
        spec = spec_named(fam.name)
        assert (fam.lr, fam.rank, fam.alpha, fam.lora_targets, fam.blocks) == (spec.lr, spec.rank, spec.alpha,
                                                                                spec.lora_targets, spec.blocks)


def test_the_readme_and_method_tables_are_generated_from_the_spec():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "family_tables.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for path in (ROOT / "README.md", ROOT / "docs" / "method.md"):
        text = path.read_text()
        assert f"{FLUX2_KLEIN.steps}, batch {FLUX2_KLEIN.batch_size} × grad_accum {FLUX2_KLEIN.grad_accum}" in text

"""Shared fixtures: tiny random toy models (non-zero adaLN gates, so LoRA gradients are non-zero from
step 0) and small image folders written with PIL."""
import pytest
import torch

from dopsd_core.toy.denoiser import random_toy
from testutil import TINY, records_for, run_cli, write_image_folder

# Tiny models gain nothing from threads, and threads contend with anything else running.
torch.set_num_threads(1)


@pytest.fixture
def tiny_toy():
    def make(seed: int = 0, gate_std: float = 0.05):
        return random_toy(TINY, seed=seed, gate_std=gate_std)
    return make


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_records(tiny_toy, image_folder):
    def make(seed: int = 0):
        den = tiny_toy(seed)
        return den, records_for(den, image_folder)
    return make

"""Optimizers and the learning-rate schedule: warmup + constant/cosine, AdamW 8-bit states and exact resume."""
import sys

import pytest
import torch

from dopsd_core.errors import DopsdError, TrainingCancelled
from dopsd_core.lora import read_lora_file
from dopsd_core.optim import build_optimizer, lr_at
from dopsd_core.trainer import Callbacks, TrainConfig, Trainer

from testutil import CFG, lora_tensors


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, "constant") == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, "constant") == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, 10, "constant") == 1.0
    assert lr_at(10, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(99, 100, 1.0, 10, "cosine") < 0.01
    with pytest.raises(DopsdError):
        lr_at(0, 10, 1.0, 0, "linear")


def test_adamw8bit_trains_and_resumes_exactly(tiny_records, tmp_path):
    cfg = {**CFG, "optimizer": "adamw8bit"}
    den, records = tiny_records()
    Trainer(den, records, TrainConfig(steps=6, **cfg), tmp_path / "a").run()
    straight = lora_tensors(den)
    den2, records2 = tiny_records()
    trainer = Trainer(den2, records2, TrainConfig(steps=6, save_every=3, **cfg), tmp_path / "b",
                      Callbacks(should_stop=lambda: trainer.step >= 3))
    with pytest.raises(TrainingCancelled):
        trainer.run()
    opt_sd, _ = read_lora_file(tmp_path / "b/state/step-000003/optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in opt_sd.values()), "8-bit optimizer states expected"
    den3, records3 = tiny_records()
    Trainer(den3, records3, TrainConfig(steps=6, save_every=3, **cfg), tmp_path / "b", resume=True).run()
    after = lora_tensors(den3)
    assert max((straight[k] - after[k]).abs().max().item() for k in straight) <= 1e-6


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(DopsdError, match="bitsandbytes"):
        build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    with pytest.raises(DopsdError, match="unknown optimizer"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3)

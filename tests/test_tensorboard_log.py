"""--log-with tensorboard: the run's scalars and preview grids in event files TensorBoard reads back, and a
clear one-line error when the package is missing."""
import builtins

import pytest

from dopsd_core.errors import DopsdError
from dopsd_core.tensorboard_log import require


def test_a_run_logs_scalars_and_previews_that_tensorboard_reads_back(tmp_path, image_folder, cli):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    rc, _, err = cli("train", "--data", image_folder, "--steps", "3", "--rank", "4", "--k", "2", "--batch-size", "2",
                     "--prior-batch", "2", "--preview-every", "2", "--log-with", "tensorboard", "--out", run)
    assert rc == 0, err
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "it_per_s", "grad_norm", "prior_loss"} <= set(tags["scalars"]), tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    prior = [e.value for e in acc.Scalars("prior_loss")]
    assert prior[0] == 0 and prior[-1] > 0  # the student is its starting model until the first update
    assert [e.step for e in acc.Images("previews")] == [0, 2, 3]  # the start, every 2 steps and the end
    assert (run / "loss.csv").is_file()  # still written


def test_asking_for_tensorboard_without_it_is_one_clear_error(monkeypatch, tmp_path, image_folder):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(DopsdError, match="pip install tensorboard"):
        require("tensorboard")
    require("none")
    with pytest.raises(DopsdError, match="choose one of none, tensorboard"):
        require("wandb")

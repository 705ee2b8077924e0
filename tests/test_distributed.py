"""Data parallelism under torchrun, on the CPU with the gloo backend, 2 processes, the toy model.

2 processes x half the batch equal 1 process x the whole batch (the draws depend on the seed, the step and
the global sample index, not on the rank), a SIGTERM to the launcher saves the stop step once and the run
resumes with another number of processes, and a rank killed with SIGKILL stops the others with an error
within the stated timeout instead of hanging."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dopsd_core.distributed import Dist

TRAIN = ["train", "--rank", "4", "--k", "2", "--batch-size", "4", "--prior-batch", "2", "--seed", "1"]
# Equal up to the order of the gradient sum: float32 rounding, amplified a little by Adam's first steps
# (measured: 1.6e-5 after 4 steps at lr 3e-3).
LORA_TOL = 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DOPSD_DIST_TIMEOUT": "20"}


def dopsd(*args):
    return [sys.executable, "-m", "dopsd_core", *map(str, args)]


def torchrun(n: int, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "dopsd_core",
            *map(str, args)]


def run(cmd, timeout=300):
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def worst(a_dir, b_dir) -> float:
    a, b = load_file(str(a_dir / "lora.safetensors")), load_file(str(b_dir / "lora.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def history(run_dir):
    return json.loads((run_dir / "state" / "state.json").read_text())["history"]


def test_shares_of_a_batch_split_evenly_or_are_refused():
    assert [Dist(r, 2).share(4) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    assert Dist(0, 1).share(3) == slice(0, 3)
    with pytest.raises(Exception, match="split evenly over 2 processes"):
        Dist(1, 2).share(3)


def test_two_processes_equal_one_with_the_whole_batch(tmp_path, image_folder):
    run(dopsd(*TRAIN, "--data", image_folder, "--steps", 4, "--out", tmp_path / "one"))
    out = run(torchrun(2, *TRAIN, "--data", image_folder, "--steps", 4, "--out", tmp_path / "two"))
    assert "data parallel: 2 processes, 2 of the batch of 4 each" in out.stderr
    assert worst(tmp_path / "one", tmp_path / "two") <= LORA_TOL
    assert history(tmp_path / "two") == pytest.approx(history(tmp_path / "one"), abs=1e-6)
    # only rank 0 wrote: one generation, one loss file, no second copy of anything
    assert sorted(p.name for p in (tmp_path / "two" / "state").iterdir()) == ["state.json", "step-000004"]


def test_sigterm_to_the_launcher_saves_once_and_resumes_with_one_process(tmp_path, image_folder):
    run(dopsd(*TRAIN, "--data", image_folder, "--steps", 20, "--out", tmp_path / "straight"))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(2, *TRAIN, "--data", image_folder, "--steps", 20, "--out", run_dir),
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not run_dir.exists():  # rank 0 makes the folder once the model is loaded
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert "stopped at step" in err, err[-2000:]
    stopped = json.loads((run_dir / "state" / "state.json").read_text())["step"]
    assert err.count(f"stopped at step {stopped}; ") == 1  # rank 0 alone saved and said so
    assert 0 <= stopped < 20
    run(dopsd("train", "--resume", run_dir, "--steps", 20))  # another world size: one process
    assert worst(tmp_path / "straight", run_dir) <= LORA_TOL
    assert history(run_dir) == pytest.approx(history(tmp_path / "straight"), abs=1e-6)


def test_a_rank_killed_with_sigkill_stops_the_others_without_a_hang(tmp_path, image_folder):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(2, *TRAIN, "--data", image_folder, "--steps", 100000, "--save-every", 1,
                                     "--out", run_dir), stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (run_dir / "state" / "state.json").exists():
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    killed = time.time()
    os.kill(int(workers[1]), signal.SIGKILL)
    try:
        proc.communicate(timeout=90)  # the launcher's own shutdown, or DOPSD_DIST_TIMEOUT (20 s) at the latest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - killed < 90
    step = json.loads((run_dir / "state" / "state.json").read_text())["step"]
    run(dopsd("train", "--resume", run_dir, "--steps", step + 1))
    assert json.loads((run_dir / "state" / "state.json").read_text())["step"] == step + 1


def test_the_gradient_mean_is_one_flat_reduction():
    """Dist.mean_ with one process leaves tensors as they are (no process group needed)."""
    t = [torch.ones(3), torch.full((2, 2), 2.0)]
    Dist().mean_(t)
    assert t[0].tolist() == [1.0] * 3 and t[1].sum().item() == 8.0

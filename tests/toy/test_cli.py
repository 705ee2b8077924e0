"""The toy commands of `dopsd` (dopsd_core/toy/cli.py), as a user runs them (subprocesses): demo."""
import json

from PIL import Image

from testutil import needs_weights, run_cli


@needs_weights
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    rc, stdout, err = run_cli("demo", "--out", out, "--steps", "3", "--eval-prompts", "24")
    assert rc == 0, err
    for f in ("lora.safetensors", "loss.png", "samples.png", "metrics.json"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {"concept_fidelity", "retention", "leak", "cross_token", "quality_4", "quality_32", "few_step_gap", "drift"}
    assert keys <= set(metrics["base"]) and keys <= set(metrics["lora"]) and metrics["steps"] == 3
    assert metrics["base"]["drift"] == 0.0 and metrics["lora"]["drift"] > 0.0
    # the demo trains with the toy's defaults: the budget's batch and the auto prior
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["config"]["prior_weight"] == 1.0 and state["config"]["prior_batch"] == 4
    assert state["config"]["batch_size"] == 4 and "" in state["prior_prompts"]
    w, h = Image.open(out / "samples.png").size
    assert w > h > 0  # two rows (base, LoRA) of several samples
    rc, _, err = run_cli("demo", "--out", out, "--steps", "3")
    assert rc == 2 and "already holds" in err

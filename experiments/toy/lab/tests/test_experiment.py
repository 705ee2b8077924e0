"""experiment.py: the quick experiment writes a well-formed, resumable results table."""
import json

import pytest

from dopsd_core.errors import DopsdError
from dopsd_core.toy.render import HELD_OUT_SHAPES
from testutil import needs_weights


@needs_weights
def test_quick_experiment_writes_a_well_formed_table(tmp_path):
    from experiments.toy.lab.experiment import run_experiment
    res = run_experiment(tmp_path / "exp", quick=True, log=lambda *_: None)
    md = (tmp_path / "exp" / "results.md").read_text()
    assert "| concept | method | concept_fidelity |" in md
    c = HELD_OUT_SHAPES[0]
    for method in ("sft", "dopsd"):
        row = res["summary"][f"main/{c}/{method}"]
        assert 0.0 <= row["concept_fidelity"]["mean"] <= 1.0 and row["retention"]["n"] == 1
        assert f"| {c} | {method} |" in md
    assert "continual" in res["summary"] and "Continual tuning" in md
    assert (tmp_path / "exp" / "results.png").is_file()
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["summary"].keys() == res["summary"].keys()
    # resumable: a second invocation finds every run cached
    lines = []
    run_experiment(tmp_path / "exp", quick=True, log=lines.append)
    assert lines and all(line.endswith("cached") for line in lines)
    # cached runs belong to one base and plan: the full plan in the quick folder is refused, not mixed
    with pytest.raises(DopsdError, match="another toy base or plan"):
        run_experiment(tmp_path / "exp", quick=False, log=lambda *_: None)

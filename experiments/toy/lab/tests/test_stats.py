"""stats.py: per-prompt values from hit strings and the seeds-then-prompts bootstrap."""
import random

import pytest

from experiments.toy.lab.stats import bootstrap_difference, per_prompt


def test_per_prompt_averages_each_prompts_samples():
    assert per_prompt("1101", 2) == [1.0, 0.5]
    assert per_prompt("10") == [1.0, 0.0]
    with pytest.raises(ValueError):
        per_prompt("101", 2)


def test_separated_and_equal_methods():
    sep = bootstrap_difference([[1.0] * 10] * 3, [[0.0] * 10] * 3, n_boot=500)
    assert sep["diff"] == sep["lo"] == sep["hi"] == 1.0
    same = bootstrap_difference([[1, 0] * 10] * 3, [[1, 0] * 10] * 3, n_boot=2000)
    assert same["diff"] == 0.0 and same["lo"] < 0 < same["hi"]


def test_disagreeing_seeds_widen_the_interval():
    """One seed learned the concept, the other did not: the evidence is two runs, not 40 prompts, and
    resampling the seeds must show it (prompts alone would give a narrow interval around 0)."""
    split = bootstrap_difference([[1.0] * 20, [0.0] * 20], [[0.5] * 20] * 2, n_boot=4000)
    assert split["diff"] == 0.0 and split["lo"] <= -0.45 and split["hi"] >= 0.45
    steady = bootstrap_difference([[1, 0] * 10] * 2, [[0.5] * 20] * 2, n_boot=4000)
    assert steady["hi"] - steady["lo"] < split["hi"] - split["lo"]


def test_the_interval_covers_the_true_difference_most_of_the_time():
    rng = random.Random(0)
    covered, reps = 0, 120
    for r in range(reps):
        def runs(p):  # 3 training seeds, each with its own rate around p, 30 prompts
            return [[float(rng.random() < min(1, max(0, p + rng.gauss(0, 0.05)))) for _ in range(30)]
                    for _ in range(3)]
        res = bootstrap_difference(runs(0.7), runs(0.5), n_boot=800, seed=r)
        covered += res["lo"] <= 0.2 <= res["hi"]
    assert covered / reps >= 0.85, covered / reps

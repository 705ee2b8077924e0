"""toy/metrics.py: the prompt sets and what evaluate() reports (leak, cross_token, per-sample hits)."""
from dopsd_core.toy.metrics import (CROSS_PROMPTS, FIDELITY_PROMPTS, FIDELITY_SEEDS, ToyMetrics, concept_prompts,
                                    cross_token_prompts)
from dopsd_core.toy.render import CONCEPT_TOKEN
from testutil import needs_weights


def test_prompt_sets():
    train = [f"a red {CONCEPT_TOKEN['star']} number {i}" for i in range(6)]
    cp = concept_prompts("star", train)
    assert len(cp) == FIDELITY_PROMPTS and cp[:6] == train and all("[V1]" in p for p in cp)
    assert concept_prompts("star", train) == cp  # seeded
    cross = cross_token_prompts("star")
    assert len(cross) == 2 * CROSS_PROMPTS
    assert all(("[V2]" in p) != ("[V3]" in p) and "[V1]" not in p for p in cross)


@needs_weights
def test_evaluate_reports_leak_cross_token_and_the_hits_behind_every_rate():
    from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
    from dopsd_core.toy.evaluator import load_evaluator
    from dopsd_core.toy.metrics import concept_training_set
    base = load_toy_file(BASE_WEIGHTS)
    m = ToyMetrics(load_evaluator(), base, n_unrelated=12)
    captions = [caps[0] for caps in concept_training_set("star")[1]]
    r = m.evaluate(base, "star", captions)
    hits = r["hits"]
    assert len(hits["concept_fidelity"]) == FIDELITY_PROMPTS * FIDELITY_SEEDS == 96
    assert len(hits["retention"]) == len(hits["leak"]) == 12 and len(hits["cross_token"]) == 2 * CROSS_PROMPTS
    for key in ("concept_fidelity", "retention", "leak", "cross_token"):
        assert r[key] == hits[key].count("1") / len(hits[key]), key
    # the base never saw a star: its unrelated prompts are not stars (a leak needs a LoRA)
    assert r["leak"] == 0.0 and r["concept_fidelity"] <= 0.1
    assert not any(a == b == "1" for a, b in zip(hits["retention"], hits["leak"]))  # a hit is the asked shape


def test_outline_matches_names_each_token_outline_in_any_layout_and_colours():
    """outline_matches finds the token whose outline a rendering shows, in any layout, colour and
    background; the foreground mask is the shape, not the background."""
    import random

    import torch

    from dopsd_core.toy.metrics import foreground, outline_matches
    from dopsd_core.toy.render import TOKEN_OUTLINE, random_scene, render
    rng = random.Random(4)
    tokens = [t for t in TOKEN_OUTLINE for _ in range(6)]
    images = torch.stack([render(random_scene(rng, TOKEN_OUTLINE[t])) for t in tokens])
    assert outline_matches(images) == tokens
    scene = random_scene(rng, "circle", "red", "navy")
    mask = foreground(render(scene)[None])[0]
    assert 0.15 < mask.float().mean() < 0.4  # the shape, not the background
    same = outline_matches(torch.stack([render(random_scene(rng, TOKEN_OUTLINE["[v2]"])) for _ in range(30)]))
    assert same.count("[v2]") == 30

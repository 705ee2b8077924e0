"""toy/render.py: exported concept folders round-trip through `dopsd train`; blob outlines."""
import random

import torch

from dopsd_core.data import load_image_folder
from dopsd_core.toy.render import CONCEPT_TOKEN, export_concept_folder, render
from testutil import run_cli


def test_concept_export_round_trips_through_train(tmp_path):
    folder = tmp_path / "heart"
    scenes = export_concept_folder("heart", folder, n=4)
    items = load_image_folder(folder, 32)
    assert len(items) == 4 and all(CONCEPT_TOKEN["heart"] in c for i in items for c in i.captions)
    assert torch.allclose(items[0].image, render(scenes[0]), atol=1 / 255 + 1e-6)  # PNG is lossless up to 8 bits
    rc, _, err = run_cli("train", "--data", folder, "--steps", "2", "--out", tmp_path / "run", "--k", "2")
    assert rc == 0, err
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_blob_outlines_are_deterministic_and_varied():
    from dopsd_core.toy.render import Scene, random_blob_scene
    assert torch.equal(render(random_blob_scene(random.Random(3))), render(random_blob_scene(random.Random(3))))
    # the same placement for every seed: only the outline differs
    masks = [render(Scene(f"blob:{seed}", "white", "black", 16.0, 16.0, 10.0))[0] > 0.5 for seed in range(12)]
    cover = [m.float().mean().item() for m in masks]
    assert all(0.03 < c < 0.33 for c in cover), cover  # never empty, never the whole disc
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (i, j, iou)


def test_token_outlines_are_distinct_and_never_a_held_out_shape():
    """Each concept token's own outline (what the base draws for it) must not count as a concept: the
    evaluator never calls it star, heart or crescent, and no two tokens share an outline."""
    from dopsd_core.toy.evaluator import WEIGHTS, load_evaluator
    from dopsd_core.toy.render import HELD_OUT_SHAPES, TOKEN_OUTLINE, Scene, random_scene
    from dopsd_core.toy.text import CONCEPT_TOKENS
    assert sorted(TOKEN_OUTLINE) == sorted(CONCEPT_TOKENS)
    masks = [render(Scene(s, "white", "black", 16.0, 16.0, 10.0))[0] > 0.5 for s in TOKEN_OUTLINE.values()]
    for i in range(len(masks)):
        for j in range(i):
            assert ((masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()).item() < 0.6, (i, j)
    if not WEIGHTS.is_file():
        return
    ev = load_evaluator()
    rng = random.Random(1)
    images = torch.stack([render(random_scene(rng, s)) for s in TOKEN_OUTLINE.values() for _ in range(16)])
    shapes, _ = ev.classify(images)
    assert not any(s in HELD_OUT_SHAPES for s in shapes)

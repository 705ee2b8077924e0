"""toy/runs.py: the exported concept data (once) and `--prior-prompts auto` for a toy concept. No training."""
import json

import pytest
import torch

from dopsd_core.errors import DopsdError
from dopsd_core.fileio import save_tensors
from dopsd_core.toy import runs
from dopsd_core.toy.render import prior_prompts
from dopsd_core.toy.render import CONCEPT_TOKEN


def _captions(folder):
    """Every caption line of the folder's .txt files, in file order (read here, not through the loader)."""
    return [line.strip() for txt in sorted(folder.glob("*.txt"))
            for line in txt.read_text().splitlines() if line.strip()]


def _without(caption, token, word=""):
    return " ".join(caption.replace(token, word).split())


def _unique(prompts):
    out = []
    for p in prompts:
        if p not in out:
            out.append(p)
    return out


@pytest.fixture(scope="module")
def star_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    runs.concept_data("star", root)
    return root


def test_concept_data_exports_the_concept_folder(star_root):
    folder = star_root / "data" / "star"
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert pngs and [p.stem for p in pngs] == [t.stem for t in txts]
    caps = _captions(folder)
    assert caps and all(CONCEPT_TOKEN["star"] in c for c in caps)
    assert not any("star" in c for c in caps)  # the token stands in for the shape word


def test_concept_data_exports_only_once(star_root, monkeypatch):
    folder = star_root / "data" / "star"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}

    def export(*a, **k):
        raise AssertionError("exported again")
    monkeypatch.setattr(runs, "export_concept_folder", export)
    assert runs.concept_data("star", star_root) == folder
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_concept_data_keeps_a_users_edits(tmp_path):
    folder = runs.concept_data("heart", tmp_path)
    assert folder == tmp_path / "data" / "heart"
    txt = sorted(folder.glob("*.txt"))[0]
    txt.write_text("an edited [V2]\n")
    runs.concept_data("heart", tmp_path)
    assert txt.read_text() == "an edited [V2]\n"


def test_concept_data_exports_into_an_existing_folder_without_images(tmp_path):
    folder = tmp_path / "data" / "crescent"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    runs.concept_data("crescent", tmp_path)
    assert any(folder.glob("*.png"))


def test_auto_prior_is_the_captions_without_the_token_the_empty_prompt_and_generic_prompts(star_root):
    token = CONCEPT_TOKEN["star"]
    caps = _captions(star_root / "data" / "star")
    got = runs.auto_prior("star", star_root)
    want = _unique([_without(c, token) for c in caps] + [""] + prior_prompts())
    assert got == want
    assert "" in got and not any(token in p for p in got)
    assert len(got) == len(set(got))


def test_auto_prior_with_a_class_word(star_root):
    token = CONCEPT_TOKEN["star"]
    caps = _captions(star_root / "data" / "star")
    got = runs.auto_prior("star", star_root, class_word="shape")
    replaced = _unique(_without(c, token, "shape") for c in caps)
    assert got[:len(replaced)] == replaced and got[len(replaced)] == ""
    assert all("shape" in p for p in replaced)


def test_auto_prior_adds_an_init_loras_concepts(star_root, tmp_path):
    earlier = [{"trigger": "[V2]", "captions": ["a red [V2] on a black background", "a [V2]"]},
               {"trigger": "[V3]", "captions": ["a blue [V3]"]}]
    lora = tmp_path / "init.safetensors"
    save_tensors({"x.lora_down.weight": torch.zeros(4, 8)}, lora, {"dopsd.concepts": json.dumps(earlier)})
    token = CONCEPT_TOKEN["star"]
    caps = _captions(star_root / "data" / "star")
    got = runs.auto_prior("star", star_root, init_lora=lora)
    earlier_caps = ["a red [V2] on a black background", "a [V2]", "a blue [V3]"]
    want = _unique([_without(c, token) for c in caps] + [""] + earlier_caps + prior_prompts())
    assert got == want
    # the earlier concepts keep their own tokens: the prior preserves what they learned
    assert all(c in got for c in earlier_caps)


def test_auto_prior_without_concepts_metadata_adds_nothing(star_root, tmp_path):
    lora = tmp_path / "plain.safetensors"
    save_tensors({"x.lora_down.weight": torch.zeros(4, 8)}, lora, {"dopsd.rank": "4"})
    assert runs.auto_prior("star", star_root, init_lora=lora) == runs.auto_prior("star", star_root)


def test_auto_prior_refuses_a_missing_init_lora(star_root, tmp_path):
    with pytest.raises(DopsdError, match="does not exist"):
        runs.auto_prior("star", star_root, init_lora=tmp_path / "missing.safetensors")

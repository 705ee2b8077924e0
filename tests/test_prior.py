"""prior.py: the trigger, auto prompts, prompt files and the concepts a LoRA records."""
import pytest

from dopsd_core.errors import DopsdError
from dopsd_core.prior import (auto_prior_prompts, concepts_record, earlier_concepts, find_trigger,
                              read_prompt_file, replace_trigger)


def test_trigger_is_the_one_bracket_token():
    assert find_trigger(["a red [V1] on black", "the [V1]"]) == "[V1]"
    with pytest.raises(DopsdError, match="--trigger"):
        find_trigger(["a red star"])
    with pytest.raises(DopsdError, match=r"\[V1\], \[V2\]"):
        find_trigger(["a [V1]", "a [V2]"])


def test_auto_prompts_replace_the_trigger_add_the_empty_prompt_earlier_concepts_and_generic_ones():
    caps = ["a red [V1] on a black background", "a [V1]", "a red [V1] on a black background"]
    assert replace_trigger(caps[0], "[V1]", None) == "a red on a black background"
    earlier = [{"trigger": "[V2]", "captions": ["a blue [V2]"]}]
    got = auto_prior_prompts(caps, "[V1]", "shape", ["a red circle", "a shape"], earlier)
    assert got == ["a red shape on a black background", "a shape", "", "a blue [V2]", "a red circle"]
    with pytest.raises(DopsdError, match="no caption contains"):
        auto_prior_prompts(caps, "[V9]", None, [])
    assert auto_prior_prompts(caps, None, None, ["g"]) == ["a red on a black background", "a", "", "g"]


def test_auto_prompts_without_a_trigger_keep_only_the_empty_earlier_and_generic_prompts():
    # plain captions name nothing: keeping them as they were would fight the concept, so they are left out
    assert auto_prior_prompts(["a photo of my dog", "my dog"], None, "dog", ["a cat"]) == ["", "a cat"]
    with pytest.raises(DopsdError, match=r"several bracket tokens \(\[V1\], \[V2\]\)"):
        auto_prior_prompts(["a [V1]", "a [V2]"], None, None, [])


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n<empty>\n  a blue square  \na red circle\n")
    assert read_prompt_file(f) == ["a red circle", "", "a blue square"]
    f.write_text("\n \n")
    with pytest.raises(DopsdError, match="no prompts"):
        read_prompt_file(f)
    with pytest.raises(DopsdError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_concepts_accumulate_across_warm_starts():
    first = concepts_record(["a [V1]", "a [V1]"], "[V1]")
    assert first == [{"trigger": "[V1]", "captions": ["a [V1]"]}]
    import json
    second = concepts_record(["a [V2]"], "[V2]", earlier_concepts({"dopsd.concepts": json.dumps(first)}))
    assert [c["trigger"] for c in second] == ["[V1]", "[V2]"]
    assert earlier_concepts({}) == []

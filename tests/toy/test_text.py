"""toy/text.py: the toy tokenizer (unknown words, concept tokens, padding)."""
import logging

from dopsd_core.toy import text as toy_text


def test_tokenizer_unknown_words_warn_once_and_concept_tokens_are_distinct(caplog):
    toy_text._warned.clear()
    with caplog.at_level(logging.WARNING, logger="dopsd.toy"):
        ids = toy_text.tokenize("a purple circle")
        toy_text.tokenize("another purple square")
    unk = toy_text.TOKEN_ID["<unk>"]
    assert ids[:3] == [toy_text.TOKEN_ID["a"], unk, toy_text.TOKEN_ID["circle"]]
    assert ids[3:] == [toy_text.TOKEN_ID["<pad>"]] * (toy_text.MAX_TOKENS - 3)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("'purple'" in w for w in warnings) == 1 and sum("'another'" in w for w in warnings) == 1
    concept_ids = [toy_text.tokenize(t)[0] for t in ["[V]", "[V1]", "[v2]", "[V3]", "[V8]"]]
    assert len(set(concept_ids)) == 5 and unk not in concept_ids
    assert len(toy_text.tokenize(" ".join(["circle"] * 20))) == toy_text.MAX_TOKENS

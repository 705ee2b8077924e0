"""Prior preservation: the prompts whose behaviour a run must keep while it learns its concept.

A user knows these as ai-toolkit's Differential Output Preservation (trigger replaced by a class
word, LoRA off) and blank-prompt preservation, and as kohya/musubi regularisation images. Here the
prompts feed two different priors (the trainer applies them):
  D-OPSD  on-policy: each step also rolls the student out on prior prompts and pulls it, state by
          state, toward the starting model's prediction (text only; no images needed)
  SFT     DreamBooth's: class images the starting model generates once at its few-step setting
`auto` builds the list from the dataset's captions (trigger replaced by the class word, or removed),
the empty prompt, the captions of the concepts an --init-lora already learned (their metadata), and
a built-in list of generic prompts for the model family.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .denoiser import Context
from .errors import DopsdError

BRACKET_TOKEN = re.compile(r"\[[^\[\]\s]+\]")  # [V], [V1], [sks]: the usual way to name a new concept


def find_trigger(captions: list[str]) -> str:
    """The one bracket token the captions use for their concept."""
    tokens = sorted({t for c in captions for t in BRACKET_TOKEN.findall(c)})
    if len(tokens) == 1:
        return tokens[0]
    if not tokens:
        raise DopsdError("the captions have no bracket token such as [V] naming the concept; pass --trigger WORD "
                         "(the word in the captions that names it)")
    raise DopsdError(f"the captions use several bracket tokens ({', '.join(tokens)}); pass --trigger with the one "
                     "that names the concept")


def replace_trigger(caption: str, trigger: str, class_word: str | None) -> str:
    """The caption with its trigger replaced by the class word (or removed), spaces tidied."""
    return " ".join(caption.replace(trigger, class_word or "").split())


def _unique(prompts) -> list[str]:
    return list(dict.fromkeys(prompts))


def auto_prior_prompts(captions: list[str], trigger: str | None, class_word: str | None, generic: list[str],
                       earlier_concepts: list[dict] | None = None) -> list[str]:
    """captions with the trigger replaced, the empty prompt, earlier concepts' own captions, generic prompts.
    trigger None: the captions' bracket token; when they have none, the captions are left out (nothing
    in them marks the concept, so keeping their old behaviour would fight it). Several: an error."""
    if trigger is None and any(BRACKET_TOKEN.search(c) for c in captions):
        trigger = find_trigger(captions)
    if trigger is not None and not any(trigger in c for c in captions):
        raise DopsdError(f"no caption contains the trigger {trigger!r}; pass the word the captions use with --trigger")
    replaced = [replace_trigger(c, trigger, class_word) for c in captions] if trigger else []
    earlier = [c for concept in earlier_concepts or [] for c in concept.get("captions", [])]
    return _unique(replaced + [""] + earlier + list(generic))


def parse_prompt_lines(text: str) -> list[str]:
    """One prompt per line; blank lines are skipped (write <empty> for the empty prompt)."""
    return _unique("" if line.strip() == "<empty>" else line.strip() for line in text.splitlines() if line.strip())


def read_prompt_file(path: Path, what: str = "prior prompt") -> list[str]:
    path = Path(path)
    if not path.is_file():
        hint = ", or --prior-prompts auto" if what == "prior prompt" else ""
        raise DopsdError(f"{what} file {path} does not exist; pass a text file with one prompt per line{hint}")
    prompts = parse_prompt_lines(path.read_text(encoding="utf-8"))
    if not prompts:
        raise DopsdError(f"{what} file {path} has no prompts; write one per line")
    return prompts


def trigger_or_none(captions: list[str]) -> str | None:
    try:
        return find_trigger(captions)
    except DopsdError:
        return None


def concepts_record(captions: list[str], trigger: str | None, earlier: list[dict] | None = None) -> list[dict]:
    """What a LoRA's metadata keeps of the concepts it learned: every earlier one, then this run's."""
    return list(earlier or []) + [{"trigger": trigger, "captions": _unique(captions)}]


@dataclass
class Prior:
    """The prior prompts and their contexts (the adapter's student encoding: text only)."""
    captions: list[str]
    contexts: list[Context]


def earlier_concepts(lora_metadata: dict[str, str]) -> list[dict]:
    """The concepts a LoRA file records (its warm starts' included)."""
    return json.loads(lora_metadata.get("dopsd.concepts", "[]"))

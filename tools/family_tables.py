"""Writes the per-family settings tables of README.md and docs/method.md from the family spec
(dopsd_core/family_spec.py), so that no default is typed twice. Each table lives between
`<!-- NAME:begin -->` and `<!-- NAME:end -->`.

    python tools/family_tables.py          # rewrite the tables
    python tools/family_tables.py --check  # exit 1 if a file differs (tests/test_family_tables.py)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dopsd_core.family_spec import RELEASED, SPECS, FamilySpec, number_text  # noqa: E402

ORDER = ("flux2-klein", "z-image", "toy")  # the user's families first


def _specs() -> list[FamilySpec]:
    return sorted(SPECS, key=lambda s: ORDER.index(s.name))


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


_num = number_text


CHANGE_WORDS = {"optimizer": {"adamw8bit": "8-bit AdamW", "adamw": "AdamW"}, "checkpointing": {True: "checkpointing"}}


def _preset_text(spec: FamilySpec) -> str:
    if not spec.gpu_presets:
        return "– (CPU)"
    def words(changes: dict) -> str:
        out = [f"rank {changes['rank']} / alpha {_num(changes['alpha'])}"] if "rank" in changes else []
        out += [CHANGE_WORDS[k][v] for k, v in changes.items() if k in CHANGE_WORDS and v in CHANGE_WORDS[k]]
        return ", ".join(out)
    return "; ".join(f"*{p.label.split(' (')[0]}*: {words(p.changes)}" for p in spec.gpu_presets)


def settings_table() -> str:
    """The settings a user picks from, per family: README and docs/method.md."""
    specs = _specs()
    lines = [_row("setting", [s.title for s in specs]), "|---|" + "---|" * len(specs),
             _row("teacher context (built by `DOPSDDataset`)", [s.teacher_text for s in specs]),
             _row("roll-out grid, K", [f"{s.grid_text}; K = {s.k}" for s in specs]),
             _row("lr, rank / alpha", [f"{_num(s.lr)}, {s.rank} / {_num(s.alpha)}" for s in specs]),
             _row("steps, batch", [f"{s.steps}, batch {s.batch_size} × grad_accum {s.grad_accum}" for s in specs]),
             _row("prior (λ, roll-outs per micro-batch)", [f"{s.prior_weight:g}, {s.prior_batch}" for s in specs]),
             _row("D-OPSD's supervised states (concept; prior), prior on every N-th step",
                  [f"{s.states}; {s.states if s.prior_states == 'same' else s.prior_states}; N = {s.prior_every}"
                   for s in specs]),
             _row("resolution", [f"{s.resolution} (fixed)" if s.fixed_resolution else f"{s.resolution}, aspect buckets"
                                 for s in specs]),
             _row("GPU presets (what each changes)", [_preset_text(s) for s in specs]),
             _row("sampling after training", [s.sampling_text for s in specs])]
    return "\n".join(lines) + "\n"


def sources_table() -> str:
    """Where each default comes from: docs/method.md."""
    specs = _specs()
    keys = list(dict.fromkeys(k for s in specs for k in s.sources))
    lines = [_row("default", [s.title for s in specs]), "|---|" + "---|" * len(specs)]
    for k in keys:
        lines.append(_row(k, ["**released**" if s.sources.get(k) == RELEASED else s.sources.get(k, "–")
                              for s in specs]))
    lines.append(_row("LoRA targets (regex under `diffusion_model.`)", [f"`{s.lora_targets}`" for s in specs]))
    lines.append(_row("checkpointed blocks", [f"`{s.blocks}`" for s in specs]))
    return "\n".join(lines) + "\n"


BLOCKS = {ROOT / "README.md": {"family-settings": settings_table},
          ROOT / "docs" / "method.md": {"family-settings": settings_table, "family-sources": sources_table}}


def render(text: str, blocks: dict) -> str:
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"no <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + make() + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for path, blocks in BLOCKS.items():
        old = path.read_text(encoding="utf-8")
        new = render(old, blocks)
        if new != old:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(new, encoding="utf-8")
    if check and stale:
        print("stale family tables (run python tools/family_tables.py):", ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

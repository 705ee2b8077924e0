"""Writes the README's memory table (between `<!-- memory:begin -->` and `<!-- memory:end -->`) from
bench/results/memory.json (projected by bench/memory.py) and, once a GPU has run bench/gpu_table.py,
bench/results/gpu_table.json (measured, in its own column).

    python tools/memory_table.py          # rewrite the block
    python tools/memory_table.py --check  # exit 1 if README.md differs (tests/test_memory.py)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MEMORY = ROOT / "bench" / "results" / "memory.json"
GPU = ROOT / "bench" / "results" / "gpu_table.json"
OPT = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW"}


def _preset(row: dict) -> str:
    name = row["preset"].split(" (")[0]
    ckpt = ", checkpointing" if row["checkpointing"] else ""
    return f"{name} (rank {row['rank']}, {OPT[row['optimizer']]}{ckpt})"


def _fits(row: dict) -> str:
    return ", ".join(f"{c}" for c in row["dopsd_fits_gb"]) or "none"


def _offload(row: dict, blocks: dict) -> str:
    n = row["offload_blocks_12gb"]
    if n == 0:
        return "0 (fits)"
    if n is None:
        return "no: the rest exceeds 12 GB"
    return f"{n} of {blocks[row['model']]}"


def _measured(gpu: dict | None, row: dict) -> str:
    if not gpu:
        return ""
    got = {r["method"]: r for r in gpu["rows"] if (r["model"], r["base"], r["preset"]) ==
           (row["model"], row["base"], row["preset"])}
    cells = [f"{got[m]['max_memory_allocated_gib']:.1f}" if m in got else "–" for m in ("dopsd", "sft")]
    return " | " + " / ".join(cells)


def table(memory: dict, gpu: dict | None = None) -> str:
    rows = memory["projection"]
    blocks = memory.get("blocks", {})
    head = ("| model | preset | base | D-OPSD 768² | D-OPSD 1024² | SFT 768² | SFT 1024² | D-OPSD / SFT at 1024² "
            "| fits (GB cards, D-OPSD 1024²) | offload: blocks kept in RAM for 12 GB |")
    sep = "|---|---|---|---:|---:|---:|---:|---:|---|---|"
    if gpu:
        head += " measured 1024² D-OPSD / SFT (GiB) |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        if r.get("not_projected"):
            lines.append(f"| {r['title']} | {_preset(r)} | {r['base']} | {r['not_projected']} | | | | | | |"
                         + (" |" if gpu else ""))
            continue
        lines.append(f"| {r['title']} | {_preset(r)} | {r['base']} | {r['dopsd_768_gib']:.1f} | {r['dopsd_1024_gib']:.1f} "
                     f"| {r['sft_768_gib']:.1f} | {r['sft_1024_gib']:.1f} | {r['dopsd_over_sft_1024']:.3f} "
                     f"| {_fits(r)} | {_offload(r, blocks)} |{_measured(gpu, r)}")
    v = memory["validation"]
    worst = max(v, key=lambda x: abs(x["error_pct"]))
    note = (f"\nProjected peak GiB of one training step (batch 1) on a CUDA device, `torch.cuda.max_memory_allocated` "
            f"terms; a card fits when the peak is at most its size minus {memory['card_reserve_gib']} GiB (CUDA context, "
            f"allocator slack). Projection checked against {len(v)} CPU measurements of deeper stand-ins at a larger "
            f"resolution than the fit's: largest error {abs(worst['error_pct']):.1f} % (bench/results/memory.json, "
            "docs/benchmarks.md).\n")
    return "\n".join(lines) + "\n" + note


def render(text: str, block: str) -> str:
    pattern = re.compile(r"(<!-- memory:begin -->\n).*?(<!-- memory:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- memory:begin/end --> markers")
    return pattern.sub(lambda m: m.group(1) + block + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    memory = json.loads(MEMORY.read_text(encoding="utf-8"))
    gpu = json.loads(GPU.read_text(encoding="utf-8")) if GPU.is_file() else None
    if gpu and gpu.get("tiny"):
        gpu = None
    old = README.read_text(encoding="utf-8")
    new = render(old, table(memory, gpu))
    if new != old:
        if check:
            print("README.md's memory table is stale: run python tools/memory_table.py")
            return 1
        README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

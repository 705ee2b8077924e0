"""The pre-flight teacher check: D-OPSD cannot teach what its teacher does not draw.

Before the first step the trainer's teacher (the model with the target in context) samples a few
training images' captions at the family's few-step setting, and so does the student (caption only) on
the same noise. Each teacher sample is judged against its target:

- a `judge` that names what an image shows (the toy: its evaluator's shape) says whether the teacher
  draws the target's shape, and what it draws instead;
- for any other model, in latent space: the teacher's samples must be closer to the target than the
  student's own (PSNR at least MARGIN_DB higher). A teacher no closer to the image in its context than
  the caption alone is not showing the concept.

The report goes to the CLI log, the live view and <run>/teacher_check.json; the run goes on, or stops
when asked (`--teacher-check stop`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .denoiser import Denoiser, Record, sample

MODES = ("warn", "stop", "off")
MARGIN_DB = 1.0
ADVICE = ("the teacher does not draw these targets, so D-OPSD cannot teach them: try other captions or "
          "another teacher context (DOPSDTeacherPreview / dopsd preview-teacher show what it draws), or train "
          "this concept with SFT + prior")


@dataclass
class TeacherCheck:
    passed: bool
    seconds: float
    entries: list[dict] = field(default_factory=list)
    advice: str = ""

    def summary(self) -> str:
        ok = sum(e["passed"] for e in self.entries)
        head = (f"teacher check: {ok}/{len(self.entries)} training images drawn by the teacher "
                f"({self.seconds:.1f} s)")
        failed = [e for e in self.entries if not e["passed"]]
        lines = [head] + [f"  {e['image']} | {e['caption']!r}: {e['verdict']}" for e in failed]
        if not self.passed:
            lines.append("  " + self.advice)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a.float() - b.float()) ** 2).mean().clamp_min(1e-10)))


def check_teacher(den: Denoiser, records: list[Record], steps: int, *, images: int = 4, samples: int = 2,
                  seed: int = 0, judge: Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]] | None = None,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TeacherCheck:
    """records: the dataset's; the first caption of up to `images` of them. judge(target_image [H, W, 3],
    samples [n, H, W, 3]) -> (passed, verdict), given decode(latents) -> images; without a judge, the
    latent-space rule above. The LoRA must be attached (its teacher copy is what the run starts from)."""
    t0 = time.perf_counter()
    lora = den.lora()
    entries = []
    with torch.no_grad():
        for r in records[:images]:
            shape = tuple(r.x0.shape)
            sigmas = den.sigma_grid(steps, shape)

            def draw(ctx, mode):
                with lora.use(mode):
                    return sample(den, den.batch_contexts([ctx] * samples), (samples, *shape), sigmas,
                                  torch.Generator().manual_seed(seed), device=r.x0.device)
            teacher = draw(r.teacher_ctx[0], "teacher")
            entry = {"image": r.name, "caption": r.captions[0]}
            if judge is not None:
                passed, verdict = judge(decode(r.x0[None])[0], decode(teacher))
            else:
                student = draw(r.student_ctx[0], "student")
                t_db = sum(_psnr(x, r.x0) for x in teacher) / samples
                s_db = sum(_psnr(x, r.x0) for x in student) / samples
                passed = t_db >= s_db + MARGIN_DB
                verdict = f"teacher {t_db:.1f} dB from the target, caption alone {s_db:.1f} dB"
                entry.update(teacher_psnr_db=round(t_db, 2), student_psnr_db=round(s_db, 2))
            entry.update(passed=bool(passed), verdict=verdict)
            entries.append(entry)
    passed = sum(e["passed"] for e in entries) * 2 > len(entries)  # most targets drawn
    return TeacherCheck(passed, time.perf_counter() - t0, entries, "" if passed else ADVICE)


def toy_judge():
    """The toy evaluator's verdict: does the teacher draw the target's shape, and what does it draw?"""
    from collections import Counter

    from .toy.evaluator import load_evaluator
    ev = load_evaluator()

    def judge(target: torch.Tensor, images: torch.Tensor) -> tuple[bool, str]:
        want = ev.classify(target[None].permute(0, 3, 1, 2))[0][0]
        got = Counter(ev.classify(images.permute(0, 3, 1, 2))[0])
        hits = got.get(want, 0)
        drawn = ", ".join(f"{k} {v}/{len(images)}" for k, v in got.most_common())
        return hits * 2 >= len(images), f"target is a {want}; teacher draws {drawn}"
    return judge


def write_teacher_preview(per_image, n: int, out, verdict=None) -> int:
    """`dopsd preview-teacher`'s output for any family. per_image yields (image name, [(caption, target image
    [1, H, W, 3], teacher samples [n, H, W, 3]) ...]) in [0, 1]; verdict(images) names what they show (the toy).
    Writes one PNG per image (per row: the target, then the samples) and report.json; prints a line per
    caption. Returns the number of images."""
    from pathlib import Path

    from .fileio import save_json
    from .plot import image_grid, save_png
    out, report, count = Path(out), [], 0
    for name, rows in per_image:
        grid = []
        for caption, target, images in rows:
            psnr = [_psnr(img, target[0]) for img in images]
            entry = {"image": name, "caption": caption, "psnr_db": [round(v, 2) for v in psnr]}
            line = f"{name} | {caption!r}: PSNR to the target {sum(psnr) / len(psnr):.1f} dB"
            if verdict:
                entry["shapes"] = verdict(images)
                line += "; drawn as " + ", ".join(f"{k} {v}/{n}" for k, v in entry["shapes"].items())
            print(line)
            report.append(entry)
            grid.append(torch.cat([target, images]))
        scale = max(1, 128 // max(grid[0].shape[1:3]))
        save_png(image_grid(grid, scale=scale), out / f"{Path(name).stem}.png")
        count += 1
    save_json(report, out / "report.json")
    print(f"wrote {count} PNGs (per row: the target, then {n} teacher samples) and {out / 'report.json'}")
    return count

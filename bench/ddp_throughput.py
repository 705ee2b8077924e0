"""Steps per second of `dopsd train --model toy` with 1 and with N processes under torchrun, the same global
batch, measured in one run (each arm its own launch; the ratio is what matters, absolute times only on
the machine that measured them).

    python bench/ddp_throughput.py --processes 2 --steps 30 [--batch-size 4] [--json]

The run's own log gives the rate: the trainer's it/s at the last step (model loading and process-group
start-up are outside it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def rate(cmd: list[str], env: dict) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(re.findall(r"([\d.]+) it/s", out.stderr)[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the report here (e.g. bench/results/ddp_throughput.json)")
    args = ap.parse_args(argv)
    from testutil import write_image_folder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_image_folder(Path(tmp) / "data")
        common = ["train", "--data", str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--prior-batch", str(args.batch_size), "--rank", "16", "--teacher-check", "off"]
        one = rate([sys.executable, "-m", "dopsd_core", *common, "--out", f"{tmp}/one"], env)
        many = rate([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={args.processes}", "-m", "dopsd_core", *common, "--out", f"{tmp}/many"], env)
    report = {"processes": args.processes, "global_batch": args.batch_size, "steps": args.steps,
              "cpu_cores": os.cpu_count(), "one_process_it_per_s": one, "n_processes_it_per_s": many,
              "speedup": many / one}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else
          f"{args.processes} processes: {many:.2f} it/s, 1 process: {one:.2f} it/s, speed-up {many / one:.2f}x "
          f"(global batch {args.batch_size}, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

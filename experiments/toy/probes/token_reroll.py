"""Probe: re-roll the embedding rows of [V1] [V2] [V3] (norm-matched) and measure fidelity, cross-token, leak, teacher."""
import json, sys, time
from pathlib import Path
import torch
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import load_evaluator
from dopsd_core.toy.metrics import ToyMetrics, generate, concept_training_set
from dopsd_core.toy.runs import train_concept
from dopsd_core.toy.text import COLOURS, BACKGROUNDS
from reroll import rerolled_base
import random

torch.set_num_threads(2)
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
mode = sys.argv[2]  # reroll | orig
lr = float(sys.argv[3]); steps = int(sys.argv[4])
base_path = BASE_WEIGHTS
if mode == "reroll":
    base_path = rerolled_base(out)

ev = load_evaluator()
base = load_toy_file(base_path)
m = ToyMetrics(ev, base, n_unrelated=192)
res = {"mode": mode, "lr": lr, "steps": steps}
# teacher fidelity per concept
for shape in ("star", "heart", "crescent"):
    imgs, caps = concept_training_set(shape)
    res[f"teacher_{shape}"] = m.teacher_fidelity(base, shape, imgs, caps)
print(res, flush=True)

def prompts_for(token, n=24, seed=0):
    rng = random.Random(f"p-{token}-{seed}")
    return [f"a {rng.choice(COLOURS)} {token} on a {rng.choice(BACKGROUNDS)} background" for _ in range(n)]

t0 = time.time()
den = train_concept("star", "dopsd", out / f"run_{mode}_{lr}_{steps}", out, seed=0, base=base_path, steps=steps, lr=lr)
res["train_s"] = time.time() - t0
def share(images, shape):
    s, _ = ev.classify(images); return sum(x == shape for x in s) / len(s)
fid = [share(generate(den, prompts_for("[V1]"), 4, seed), "star") for seed in range(4)]
res["fidelity"] = sum(fid) / 4
res["cross_V2"] = sum(share(generate(den, prompts_for("[V2]"), 4, seed), "star") for seed in range(2)) / 2
res["cross_V3"] = sum(share(generate(den, prompts_for("[V3]"), 4, seed), "star") for seed in range(2)) / 2
un = [p for p, *_ in m.unrelated]
s4 = generate(den, un, 4, 0)
res["leak"] = share(s4, "star")
res["retention"] = m.retention(s4)
print(json.dumps(res), flush=True)
json.dump(res, open(out / f"res_{mode}_{lr}_{steps}.json", "w"))

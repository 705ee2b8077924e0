"""Writes workflows/*.json (ComfyUI's UI / LiteGraph format) from the compact graphs below.

This file is the one source of the shipped workflows: edit the graphs here, never the JSON. Node
inputs, outputs and the order of widget values come from a running ComfyUI's /object_info, so the
files match what the frontend builds for those nodes:

    python tools/build_workflows.py http://127.0.0.1:8188          (or a saved object_info.json)
    python tools/build_workflows.py URL --out /tmp/wf               (somewhere else than workflows/)

From Python: write_workflows(source, out_dir), where source is a URL, a saved object_info.json or the
object_info dict itself; build_workflows(info) returns the graphs without writing them.

Check with tests/comfyui/test_workflow_builder.py (the builder against real ComfyUI reproduces the
shipped files), tests/test_workflows.py (CI) and tests/comfyui/test_browser.py (real ComfyUI + frontend).
"""
from __future__ import annotations

import argparse
import json
import urllib.request
import uuid
from pathlib import Path

from dopsd_core.family_spec import DEFAULT_PRESET, FLUX2_KLEIN, TOY, Z_IMAGE, FamilySpec, number_text

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"MarkdownNote": ["text"], "Note": ["text"]}  # virtual nodes of the frontend

# Model files: names as in ComfyUI's own templates (comfyui-workflow-templates).
KLEIN_UNET = "flux-2-klein-4b.safetensors"
KLEIN_TE = "qwen_3_4b.safetensors"
KLEIN_VAE = "flux2-vae.safetensors"
ZIMAGE_UNET = "z_image_turbo_bf16.safetensors"
ZIMAGE_TE = "qwen_3_4b.safetensors"
ZIMAGE_VAE = "ae.safetensors"
HF = "https://huggingface.co/Comfy-Org"
MODEL_URLS = {
    KLEIN_UNET: (f"{HF}/flux2-klein/resolve/main/split_files/diffusion_models/{KLEIN_UNET}", "diffusion_models"),
    KLEIN_VAE: (f"{HF}/flux2-dev/resolve/main/split_files/vae/{KLEIN_VAE}", "vae"),
    ZIMAGE_UNET: (f"{HF}/z_image_turbo/resolve/main/split_files/diffusion_models/{ZIMAGE_UNET}", "diffusion_models"),
    ZIMAGE_TE: (f"{HF}/z_image_turbo/resolve/main/split_files/text_encoders/{ZIMAGE_TE}", "text_encoders"),
    ZIMAGE_VAE: (f"{HF}/z_image_turbo/resolve/main/split_files/vae/{ZIMAGE_VAE}", "vae"),
}


def trainer_widgets(spec: FamilySpec, save_every: int, preview_every: int) -> dict:
    """The trainer node's values in a shipped workflow: the family spec's defaults written out (so the
    widgets show them), rank 0 / lr 0 = the family's (they follow a GPU preset)."""
    return {"steps": spec.steps, "gpu_preset": DEFAULT_PRESET, "rank": 0, "lr": 0.0, "optimizer": "adamw",
            "batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "seed": 0, "checkpointing": False,
            "save_every": save_every, "preview_every": preview_every, "resume": False, "offload": False,
            "prior_weight": spec.prior_weight, "prior_batch": spec.prior_batch, "init_lora": "[none]", "teacher_check": "warn",
            "tensorboard": False, "adapter": "lora", "lokr_factor": -1}


TOY_TRAIN = trainer_widgets(TOY, save_every=100, preview_every=25)
AUTO_PRIOR = {"prior_prompts": "auto", "trigger": "", "class_word": "", "sample_prompts": ""}  # DOPSDDataset: the prior (auto), default sample prompts


def dopsd_widgets(spec: FamilySpec) -> dict:
    """The D-OPSD trainer's own values: the family's K and cost levers written out, as trainer_widgets."""
    return {"k": spec.k, "teacher": "ema", "ema_decay": 0.9999, "loss_weight": "x0", "states": spec.states,
            "prior_every": spec.prior_every, "prior_states": spec.prior_states}


TOY_SAMPLE = {"seed": 0, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


class Graph:
    def __init__(self, info: dict):
        self.info, self.nodes, self.links, self.groups = info, [], [], []

    def node(self, type_, pos, size=(300, 120), title=None, mode=0, **widgets):
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": type_, "pos": list(pos), "size": list(size), "title": title,
                           "mode": mode, "widgets": widgets, "in": {}})
        return nid

    def link(self, src: int, slot: int, dst: int, input_name: str):
        self.nodes[dst - 1]["in"][input_name] = (src, slot)

    def group(self, title, bounding, color="#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 22, "flags": {}})

    def note(self, pos, size, title, text):
        return self.node("MarkdownNote", pos, size, title=title, text=text)

    def to_json(self) -> dict:
        out_nodes, links = [], []
        outputs = {}  # (node id, slot) -> links
        for n in self.nodes:
            spec = self.info.get(n["type"])
            widgets_values, inputs, outs = [], [], []
            if spec is None:
                names = FRONTEND_ONLY[n["type"]]
                widgets_values = [n["widgets"][k] for k in names]
            else:
                order = spec.get("input_order", {})
                for section in ("required", "optional"):
                    for name in order.get(section, []):
                        kind, opts = spec["input"][section][name][0], (spec["input"][section][name] + [{}])[1]
                        is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
                        if is_widget and name not in n["in"]:
                            if name not in n["widgets"]:
                                raise KeyError(f"{n['type']}: no value for widget {name!r}")
                            widgets_values.append(n["widgets"][name])
                            if _has_seed_control(kind, name, opts):
                                widgets_values.append("fixed")
                        elif not is_widget or name in n["in"]:
                            entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": None}
                            if is_widget:
                                entry["widget"] = {"name": name}
                                widgets_values.append(n["widgets"][name])
                                if _has_seed_control(kind, name, opts):
                                    widgets_values.append("fixed")
                            inputs.append(entry)
                unknown = set(n["widgets"]) - {k for s in order.values() for k in s}
                if unknown:
                    raise KeyError(f"{n['type']}: unknown widgets {sorted(unknown)}")
                for slot, (typ, name) in enumerate(zip(spec["output"], spec["output_name"])):
                    links_here = []
                    outputs[(n["id"], slot)] = links_here
                    outs.append({"name": name, "type": typ, "links": links_here, "slot_index": slot})
            node = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {},
                    "order": 0, "mode": n["mode"], "inputs": inputs, "outputs": outs,
                    "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets_values}
            if n["title"]:
                node["title"] = n["title"]
            models = [w for w in n["widgets"].values() if isinstance(w, str) and w in MODEL_URLS]
            if models:
                node["properties"]["models"] = [{"name": m, "url": MODEL_URLS[m][0], "directory": MODEL_URLS[m][1]}
                                                for m in models]
            out_nodes.append(node)
        for n, node in zip(self.nodes, out_nodes):
            for entry in node["inputs"]:
                if entry["name"] in n["in"]:
                    src, slot = n["in"][entry["name"]]
                    lid = len(links) + 1
                    typ = out_nodes[src - 1]["outputs"][slot]["type"]
                    links.append([lid, src, slot, n["id"], node["inputs"].index(entry), typ])
                    entry["link"] = lid
                    outputs[(src, slot)].append(lid)
        for order, node in enumerate(_topological(out_nodes, links)):
            node["order"] = order
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([n["type"] for n in out_nodes]))),
                "revision": 0, "last_node_id": len(out_nodes), "last_link_id": len(links), "nodes": out_nodes,
                "links": links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [520, 60]}}, "version": 0.4}


def _has_seed_control(kind, name, opts) -> bool:
    """The frontend adds a 'control after generate' widget (its value follows the seed's in
    widgets_values) when the input asks for one, and by default to INT inputs named seed/noise_seed."""
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else (kind == "INT" and name in ("seed", "noise_seed"))


def _topological(nodes, links):
    deps = {n["id"]: {l[1] for l in links if l[3] == n["id"]} for n in nodes}
    done, out = set(), []
    while len(out) < len(nodes):
        for n in nodes:
            if n["id"] not in done and deps[n["id"]] <= done:
                done.add(n["id"])
                out.append(n)
    return out


def _toy_common(g: Graph, x0=0):
    loader = g.node("DOPSDToyModelLoader", (x0, 80), (300, 80))
    concept = g.node("DOPSDToyConcept", (x0, 220), (300, 110), shape="star", count=6)
    shown = g.node("PreviewImage", (x0, 380), (300, 260), title="Training images (the star, never seen by the model)")
    g.link(concept, 0, shown, "images")
    # aspect_buckets off: the toy's images are square 32 px shapes
    data = g.node("DOPSDDataset", (x0 + 340, 80), (320, 300), folder="",
                  caption_template="a [V1]\na [V1] on a background\na photo of a [V1]", resolution=32,
                  aspect_buckets=False, **AUTO_PRIOR)
    g.link(loader, 0, data, "model")
    g.link(concept, 0, data, "images")
    g.link(loader, 1, data, "toy_text_encoder")
    prompt = g.node("DOPSDToyTextEncode", (x0 + 340, 430), (320, 120), text="a red [V1] on a black background")
    g.link(loader, 1, prompt, "text_encoder")
    empty = g.node("DOPSDToyEmptyLatent", (x0 + 340, 600), (320, 80), batch_size=4)
    return loader, data, prompt, empty


def _toy_sampler(g: Graph, model, prompt, empty, pos, title, mode=0):
    x, y = pos
    ks = g.node("KSampler", (x, y), (300, 262), title=title, mode=mode, **TOY_SAMPLE)
    g.link(model[0], model[1], ks, "model")
    g.link(prompt, 0, ks, "positive")
    g.link(prompt, 0, ks, "negative")
    g.link(empty, 0, ks, "latent_image")
    dec = g.node("DOPSDToyDecode", (x, y + 300), (300, 80), mode=mode, scale=4)
    g.link(ks, 0, dec, "samples")
    return dec


def toy_demo(info) -> dict:
    g = Graph(info)
    g.note((-420, 80), (380, 620), "Read me: D-OPSD on the built-in toy model (CPU)", (
        "## D-OPSD on the toy model\n\n"
        "Runs on a laptop CPU: **no model files are needed**. The toy is a 4-step turbo model of 32x32 "
        "coloured shapes that has never seen a star; D-OPSD teaches it the star as `[V1]` in " f"{TOY.steps} steps "
        "(a few minutes on 2 cores).\n\n"
        "1. Press **Queue** (Run).\n"
        "2. Watch the **D-OPSD Trainer** node: loss curve (raw + smoothed, `log` toggle), step/total, "
        "it/s, ETA and the latest 4-step preview of the student.\n"
        "3. *D-OPSD Save LoRA* writes `ComfyUI/models/loras/dopsd/toy_star.safetensors`; the stock "
        "*LoraLoaderModelOnly* loads that file (its lora_name is linked from the save node, so it stays empty "
        "until the file exists) and the stock *KSampler* samples it: compare *Before* (base) and *After* on "
        "the same noise, 4 steps, cfg 1.\n\n"
        "The run folder (resumable: turn *resume* on and raise *steps*) is `ComfyUI/output/dopsd/toy_star/`.\n\n"
        "The toy's weights ship with the pack. Before training the `[V1]` samples are other shapes; after it "
        "they are mostly stars (the README's experiment measures how often, and what the LoRA does to other "
        "prompts)."))
    loader, data, prompt, empty = _toy_common(g)
    trainer = g.node("DOPSDTrainer", (720, 80), (380, 660), run_name="toy_star", **TOY_TRAIN, **dopsd_widgets(TOY))
    g.link(loader, 0, trainer, "model")
    g.link(data, 0, trainer, "dataset")
    save = g.node("DOPSDSaveLoRA", (1140, 80), (320, 130), name="dopsd/toy_star", overwrite=True)
    g.link(trainer, 1, save, "lora")
    plot = g.node("DOPSDLossPlot", (1140, 250), (320, 80), log_scale=True)
    g.link(trainer, 2, plot, "loss")
    plot_view = g.node("PreviewImage", (1140, 370), (320, 280), title="Loss")
    g.link(plot, 0, plot_view, "images")
    before = _toy_sampler(g, (loader, 0), prompt, empty, (1500, 80), "Before: base model, 4 steps")
    bv = g.node("PreviewImage", (1500, 480), (300, 280), title="Before")
    g.link(before, 0, bv, "images")
    # the saved file through the stock loader: lora_name is linked from the save node, so it loads the file
    # this run saved. Its widget value stays empty: a file name there (the file does not exist before the
    # first run) would make the frontend flag a missing model when the workflow is opened.
    lora = g.node("LoraLoaderModelOnly", (1840, 880), (320, 110), lora_name="", strength_model=1.0)
    g.link(loader, 0, lora, "model")
    g.link(save, 1, lora, "lora_name")
    after = _toy_sampler(g, (lora, 0), prompt, empty, (1840, 80), "After: saved LoRA, stock loader, 4 steps")
    av = g.node("PreviewImage", (1840, 480), (300, 280), title="After")
    g.link(after, 0, av, "images")
    g.group("1. Data", (-10, 0, 690, 720))
    g.group("2. Train and save", (700, 0, 780, 1080), "#8a6d3b")
    g.group("3. Before / after: stock KSampler, same noise", (1490, 0, 680, 1020), "#3f789e")
    return g.to_json()


def sft_vs_dopsd(info) -> dict:
    g = Graph(info)
    g.note((-420, 80), (380, 560), "Read me: SFT vs D-OPSD on the toy model (CPU)", (
        "## SFT vs D-OPSD, side by side\n\n"
        "The same data, LoRA rank, steps and seed; two objectives:\n\n"
        "* **D-OPSD Trainer**: the model with the target image in context teaches the model without it, "
        "on the model's own 4-step trajectory.\n"
        "* **D-OPSD SFT Trainer**: ordinary flow matching on the images (the baseline).\n\n"
        "Both trainers draw their own live loss curve. The grid (right) has one row per model on the same "
        "noise, 4 steps, cfg 1: **base**, **D-OPSD**, **SFT**. SFT re-teaches instantaneous velocities, "
        "which is what costs turbo models their few-step sampling; D-OPSD trains on its own 4-step "
        "trajectory. The README's experiment measures both on this toy (concept fidelity, retention of "
        "other prompts, 4- vs 32-step quality), good and bad.\n\n"
        "CPU only, no model files (about 5 minutes on 2 cores); the toy's weights ship with the pack."))
    loader, data, prompt, empty = _toy_common(g)
    dopsd = g.node("DOPSDTrainer", (720, 80), (380, 660), title="D-OPSD Trainer", run_name="toy_star_dopsd",
                   **TOY_TRAIN, **dopsd_widgets(TOY))
    sft = g.node("DOPSDSFTTrainer", (1140, 80), (380, 600), title="SFT Trainer (baseline)",
                 run_name="toy_star_sft", **TOY_TRAIN)
    for t in (dopsd, sft):
        g.link(loader, 0, t, "model")
        g.link(data, 0, t, "dataset")
    rows = []
    for i, (model, title) in enumerate([((loader, 0), "base"), ((dopsd, 0), "D-OPSD"), ((sft, 0), "SFT")]):
        rows.append(_toy_sampler(g, model, prompt, empty, (1560 + 340 * i, 80), f"{title}: 4 steps"))
    b1 = g.node("ImageBatch", (1560, 500), (300, 80))
    g.link(rows[0], 0, b1, "image1")
    g.link(rows[1], 0, b1, "image2")
    b2 = g.node("ImageBatch", (1900, 500), (300, 80))
    g.link(b1, 0, b2, "image1")
    g.link(rows[2], 0, b2, "image2")
    single = g.node("RebatchImages", (1560, 620), (300, 80), batch_size=1)  # ImageGrid takes a list of images
    g.link(b2, 0, single, "images")
    grid = g.node("ImageGrid", (1560, 740), (300, 170), columns=4, cell_width=128, cell_height=128, padding=4)
    g.link(single, 0, grid, "images")
    save = g.node("SaveImage", (1900, 620), (640, 560), title="Rows: base / D-OPSD / SFT (same noise)",
                  filename_prefix="dopsd/sft_vs_dopsd_grid")
    g.link(grid, 0, save, "images")
    plots = []
    for t, y in ((dopsd, 800), (sft, 760)):
        p = g.node("DOPSDLossPlot", (720 if t == dopsd else 1140, y), (320, 80), log_scale=True)
        g.link(t, 2, p, "loss")
        v = g.node("PreviewImage", (720 if t == dopsd else 1140, y + 120), (320, 260),
                   title="D-OPSD loss" if t == dopsd else "SFT loss")
        g.link(p, 0, v, "images")
        plots.append(v)
    g.group("1. Data", (-10, 0, 690, 720))
    g.group("2. Two trainers, same settings", (700, 0, 840, 1200), "#8a6d3b")
    g.group("3. Before/after grid", (1540, 0, 1020, 1200), "#3f789e")
    return g.to_json()


def _real_family(info, family: str) -> dict:
    g = Graph(info)
    klein = family == "klein"
    unet, te, vae = (KLEIN_UNET, KLEIN_TE, KLEIN_VAE) if klein else (ZIMAGE_UNET, ZIMAGE_TE, ZIMAGE_VAE)
    name = "FLUX.2-klein 4B" if klein else "Z-Image-Turbo"
    tag = "klein" if klein else "zimage"
    spec = FLUX2_KLEIN if klein else Z_IMAGE
    files = (f"| file | folder |\n|---|---|\n| `{unet}` | `ComfyUI/models/diffusion_models/` |\n"
             f"| `{te}` | `ComfyUI/models/text_encoders/` |\n| `{vae}` | `ComfyUI/models/vae/` |\n")
    if not klein:
        files += "| `Qwen3-VL-4B-Instruct/` (Hugging Face folder) | `ComfyUI/models/dopsd_vlm/` |\n"
    teacher = ("the caption + a fixed suffix with the **target image as a reference latent** (klein's own "
               "edit path)" if klein else
               "the target image + caption through **Qwen3-VL-4B-Instruct** whose language model is replaced "
               "by Z-Image's Qwen3-4B (the *D-OPSD Qwen3-VL Loader* node)")
    g.note((-460, 80), (420, 760), f"Read me: {name} D-OPSD", (
        f"## Train a {name} LoRA with D-OPSD\n\n"
        "**Model files** (the names of ComfyUI's own templates):\n\n" + files +
        "\n**Your images**: a folder of 4-20 images of the concept, each with a same-name `.txt` caption "
        "(one variant per line, write the concept as a rare token such as `[V]` or `sks`), in "
        "`ComfyUI/input/my_concept/`; *folder* takes the folder's name there (more roots: `dopsd_datasets` in "
        "`extra_model_paths.yaml`).\n\n"
        f"**Teacher**: {teacher}.\n\n"
        "1. Check the teacher first: *D-OPSD Teacher Preview* (group 2) should already show your concept.\n"
        "2. Queue. The trainer node draws the loss curve, it/s, ETA and 4-step previews live.\n"
        "3. The LoRA lands in `ComfyUI/models/loras/dopsd/`; the run folder `output/dopsd/<run_name>` "
        "resumes (turn *resume* on).\n\n"
        f"Defaults (the family's): lr {number_text(spec.lr)}, rank {spec.rank} / alpha {spec.alpha:g}, K = {spec.k}, "
        f"{spec.steps} steps of batch {spec.batch_size} x grad_accum {spec.grad_accum}. Stop earlier when the "
        "previews show the concept: every *save_every* steps the run folder keeps a LoRA. On smaller cards "
        "pick a *gpu_preset*: " + "; ".join(p.label for p in spec.gpu_presets) + "."))
    unet_n = g.node("UNETLoader", (0, 80), (320, 100), unet_name=unet, weight_dtype="default")
    clip_n = g.node("CLIPLoader", (0, 220), (320, 120), clip_name=te, type="flux2" if klein else "lumina2",
                    device="default")
    vae_n = g.node("VAELoader", (0, 380), (320, 80), vae_name=vae)
    data = g.node("DOPSDDataset", (360, 80), (340, 320), folder="my_concept", caption_template="a photo of [V]",
                  resolution=spec.resolution, aspect_buckets=True, **AUTO_PRIOR)
    g.link(unet_n, 0, data, "model")
    g.link(clip_n, 0, data, "clip")
    g.link(vae_n, 0, data, "vae")
    if not klein:
        vl = g.node("DOPSDQwen3VLLoader", (0, 500), (320, 130), vlm_folder="Qwen3-VL-4B-Instruct",
                    text_encoder="(the clip input of D-OPSD Dataset)", dtype="auto")
        g.link(vl, 0, data, "vlm")
    train = trainer_widgets(spec, save_every=100, preview_every=50)
    trainer = g.node("DOPSDTrainer", (740, 80), (380, 660), run_name=f"{tag}_my_concept", **train, **dopsd_widgets(spec))
    g.link(unet_n, 0, trainer, "model")
    g.link(data, 0, trainer, "dataset")
    save = g.node("DOPSDSaveLoRA", (1160, 80), (320, 130), name=f"dopsd/{tag}_my_concept", overwrite=False)
    g.link(trainer, 1, save, "lora")
    plot = g.node("DOPSDLossPlot", (1160, 250), (320, 80), log_scale=True)
    g.link(trainer, 2, plot, "loss")
    pv = g.node("PreviewImage", (1160, 370), (320, 280), title="Loss")
    g.link(plot, 0, pv, "images")
    tp = g.node("DOPSDTeacherPreview", (360, 460), (340, 130), steps=0, seed=0)
    g.link(unet_n, 0, tp, "model")
    g.link(data, 0, tp, "dataset")
    tdec = g.node("VAEDecode", (360, 630), (340, 50))
    g.link(tp, 0, tdec, "samples")
    g.link(vae_n, 0, tdec, "vae")
    tview = g.node("PreviewImage", (360, 720), (340, 300), title="Teacher (caption + target image)")
    g.link(tdec, 0, tview, "images")
    # before/after with stock nodes on the same noise
    pos = g.node("CLIPTextEncode", (1520, 80), (360, 140), text="a photo of [V] on a beach")
    g.link(clip_n, 0, pos, "clip")
    neg = g.node("ConditioningZeroOut", (1520, 260), (360, 50))
    g.link(pos, 0, neg, "conditioning")
    if klein:
        latent = g.node("EmptyFlux2LatentImage", (1520, 350), (360, 110), width=1024, height=1024, batch_size=1)
        samplers = []
        for i, (model, title) in enumerate([((unet_n, 0), "Before"), ((trainer, 0), "After")]):
            x = 1920 + 380 * i
            guider = g.node("CFGGuider", (x, 80), (340, 100), cfg=1.0)
            g.link(model[0], model[1], guider, "model")
            g.link(pos, 0, guider, "positive")
            g.link(neg, 0, guider, "negative")
            sched = g.node("Flux2Scheduler", (x, 220), (340, 110), steps=4, width=1024, height=1024)
            noise = g.node("RandomNoise", (x, 370), (340, 90), noise_seed=0)
            select = g.node("KSamplerSelect", (x, 500), (340, 60), sampler_name="euler")
            sca = g.node("SamplerCustomAdvanced", (x, 600), (340, 110), title=f"{title}: 4 steps")
            g.link(noise, 0, sca, "noise")
            g.link(guider, 0, sca, "guider")
            g.link(select, 0, sca, "sampler")
            g.link(sched, 0, sca, "sigmas")
            g.link(latent, 0, sca, "latent_image")
            samplers.append((sca, title, x))
    else:
        latent = g.node("EmptySD3LatentImage", (1520, 350), (360, 110), width=1024, height=1024, batch_size=1)
        samplers = []
        for i, (model, title) in enumerate([((unet_n, 0), "Before"), ((trainer, 0), "After")]):
            x = 1920 + 380 * i
            shift = g.node("ModelSamplingAuraFlow", (x, 80), (340, 60), shift=3.0)
            g.link(model[0], model[1], shift, "model")
            ks = g.node("KSampler", (x, 180), (340, 262), title=f"{title}: 8 steps", seed=0, steps=8, cfg=1.0,
                        sampler_name="res_multistep", scheduler="simple", denoise=1.0)
            g.link(shift, 0, ks, "model")
            g.link(pos, 0, ks, "positive")
            g.link(neg, 0, ks, "negative")
            g.link(latent, 0, ks, "latent_image")
            samplers.append((ks, title, x))
    for sampler, title, x in samplers:
        dec = g.node("VAEDecode", (x, 760), (340, 50))
        g.link(sampler, 0, dec, "samples")
        g.link(vae_n, 0, dec, "vae")
        view = g.node("PreviewImage", (x, 850), (340, 380), title=title)
        g.link(dec, 0, view, "images")
    g.group("1. Models and data", (-10, 0, 720, 660 if not klein else 480))
    g.group("2. Check the teacher", (350, 420 if klein else 680, 360, 640), "#3f789e")
    g.group("3. Train and save", (730, 0, 760, 1080), "#8a6d3b")
    g.group("4. Before / after (stock sampler, same noise)", (1510, 0, 1180, 1250), "#3f789e")
    return g.to_json()


WORKFLOWS = {
    "dopsd_toy_cpu_demo.json": toy_demo,
    "dopsd_toy_sft_vs_dopsd.json": sft_vs_dopsd,
    "dopsd_flux2_klein.json": lambda info: _real_family(info, "klein"),
    "dopsd_z_image_turbo.json": lambda info: _real_family(info, "zimage"),
}


def load_object_info(source) -> dict:
    """source: the object_info dict itself, a saved object_info.json, or a running ComfyUI's URL."""
    if isinstance(source, dict):
        return source
    if Path(source).is_file():
        return json.loads(Path(source).read_text())
    with urllib.request.urlopen(str(source).rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


def build_workflows(source) -> dict[str, dict]:
    """File name -> workflow, for every shipped workflow."""
    info = load_object_info(source)
    return {name: build(info) for name, build in WORKFLOWS.items()}


def serialise(workflow: dict) -> str:
    """The text of a workflow file, exactly as shipped."""
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def write_workflows(source, out_dir=ROOT / "workflows") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, workflow in build_workflows(source).items():
        (out / name).write_text(serialise(workflow), encoding="utf-8")
        written.append(out / name)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", default="http://127.0.0.1:8188",
                    help="a running ComfyUI's URL or a saved object_info.json (default: %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "workflows"), help="output folder (default: workflows/)")
    args = ap.parse_args(argv)
    for path in write_workflows(args.source, args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()

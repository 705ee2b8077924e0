"""Shipped workflows (workflows/*.json, ComfyUI's UI format) and node docs, checked without ComfyUI:
the JSON parses, every link is consistent at both ends, every node type is ours or a stock node on
the list below, model files use the names of ComfyUI's own templates and each graph's note says where
they go. tests/comfyui/test_browser.py loads the same files into the real frontend."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# Stock ComfyUI 0.18.1 nodes the workflows may use (server nodes), and the frontend's own note nodes.
STOCK_NODES = {"KSampler", "LoraLoaderModelOnly", "PreviewImage", "SaveImage", "ImageBatch", "ImageGrid",
               "UNETLoader", "CLIPLoader", "VAELoader", "VAEDecode", "CLIPTextEncode", "ConditioningZeroOut",
               "EmptyFlux2LatentImage", "EmptySD3LatentImage", "Flux2Scheduler", "CFGGuider", "RandomNoise",
               "KSamplerSelect", "SamplerCustomAdvanced", "ModelSamplingAuraFlow", "RebatchImages"}
FRONTEND_NODES = {"MarkdownNote", "Note"}
# Model files as named in ComfyUI's templates (comfyui-workflow-templates: image_flux2_klein_text_to_image,
# image_z_image_turbo) and the models/ folder each goes into.
TEMPLATE_FILES = {
    "dopsd_flux2_klein.json": {"flux-2-klein-4b.safetensors": "diffusion_models", "qwen_3_4b.safetensors": "text_encoders",
                               "flux2-vae.safetensors": "vae"},
    "dopsd_z_image_turbo.json": {"z_image_turbo_bf16.safetensors": "diffusion_models",
                                 "qwen_3_4b.safetensors": "text_encoders", "ae.safetensors": "vae"},
}
LOADER_WIDGET = {"UNETLoader": 0, "CLIPLoader": 0, "VAELoader": 0}


def our_node_ids() -> set[str]:
    ids = set()
    for py in (ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="([A-Za-z0-9_]+)"', py.read_text()))
    return ids


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_four_workflows_ship():
    names = {p.name for p in WORKFLOWS}
    assert {"dopsd_toy_cpu_demo.json", "dopsd_toy_sft_vs_dopsd.json", "dopsd_flux2_klein.json",
            "dopsd_z_image_turbo.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_links_are_consistent(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    links = {}
    for link in wf["links"]:
        lid, src, src_slot, dst, dst_slot, typ = link
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = link
        assert src in nodes and dst in nodes, f"link {lid} names a missing node"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in out["links"], f"link {lid} not listed on node {src}'s output {out['name']}"
        assert inp["link"] == lid, f"node {dst} input {inp['name']} does not point back to link {lid}"
        assert out["type"] == typ, f"link {lid} type {typ} != output type {out['type']}"
        # "*" (any) feeds a widget input, e.g. the saved LoRA's name into a stock loader's lora_name
        assert inp["type"] == typ or (typ == "*" and "widget" in inp), \
            f"link {lid}: {out['type']} into {inp['name']} ({inp['type']})"
    for n in wf["nodes"]:
        for inp in n.get("inputs", []):
            assert inp["link"] is None or links[inp["link"]][3] == n["id"], f"node {n['id']} {inp['name']}"
        for out in n.get("outputs", []):
            for lid in out.get("links") or []:
                assert links[lid][1] == n["id"], f"node {n['id']} output {out['name']} lists foreign link {lid}"
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links, default=0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_node_is_ours_or_a_known_stock_node(path):
    ours = our_node_ids()
    assert {"DOPSDTrainer", "DOPSDDataset"} <= ours  # the id scan works
    unknown = {n["type"] for n in load(path)["nodes"]} - ours - STOCK_NODES - FRONTEND_NODES
    assert not unknown, f"{path.name}: node types neither ours nor on the stock list: {unknown}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_has_a_note_and_trains(path):
    wf = load(path)
    notes = [n for n in wf["nodes"] if n["type"] in FRONTEND_NODES]
    assert notes and all(n["widgets_values"][0].strip() for n in notes)
    assert any(n["type"] in ("DOPSDTrainer", "DOPSDSFTTrainer") for n in wf["nodes"])
    assert all(n.get("mode", 0) == 0 for n in wf["nodes"]), "muted/bypassed nodes in a shipped workflow"


@pytest.mark.parametrize("name", sorted(TEMPLATE_FILES))
def test_model_files_follow_the_templates_and_the_note_says_where(name):
    wf = load(ROOT / "workflows" / name)
    used = {n["widgets_values"][LOADER_WIDGET[n["type"]]] for n in wf["nodes"] if n["type"] in LOADER_WIDGET}
    assert used == set(TEMPLATE_FILES[name])
    note = "\n".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in FRONTEND_NODES)
    for file, folder in TEMPLATE_FILES[name].items():
        line = next((l for l in note.splitlines() if file in l), "")
        assert f"models/{folder}" in line, f"the note must say {file} goes into models/{folder}"


def _upstream(wf, node_id):
    by_id = {n["id"]: n for n in wf["nodes"]}
    seen, todo = set(), [node_id]
    while todo:
        nid = todo.pop()
        for link in wf["links"]:
            if link[3] == nid and link[1] not in seen:
                seen.add(link[1])
                todo.append(link[1])
    return {by_id[i]["type"] for i in seen}


def test_toy_demo_trains_saves_and_samples_the_file_with_stock_nodes():
    wf = load(ROOT / "workflows" / "dopsd_toy_cpu_demo.json")
    types = {n["type"] for n in wf["nodes"]}
    assert {"DOPSDToyConcept", "DOPSDDataset", "DOPSDLossPlot"} <= types
    loader = next(n for n in wf["nodes"] if n["type"] == "LoraLoaderModelOnly")
    # its lora_name is linked from the save node, so the file it loads is the one this run saved
    assert {"DOPSDSaveLoRA", "DOPSDTrainer", "DOPSDDataset"} <= _upstream(wf, loader["id"])
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert any("LoraLoaderModelOnly" in _upstream(wf, s["id"]) for s in samplers)
    assert any("DOPSDTrainer" not in _upstream(wf, s["id"]) for s in samplers), "no 'before' sample"
    trainer = next(n for n in wf["nodes"] if n["type"] == "DOPSDTrainer")
    assert trainer["widgets_values"][0] <= 400, "the CPU demo must stay within minutes on 2 cores"


def test_sft_vs_dopsd_grid_has_base_dopsd_and_sft_rows():
    wf = load(ROOT / "workflows" / "dopsd_toy_sft_vs_dopsd.json")
    grid = next(n for n in wf["nodes"] if n["type"] == "ImageGrid")
    up = _upstream(wf, grid["id"])
    assert {"DOPSDTrainer", "DOPSDSFTTrainer", "DOPSDToyModelLoader", "KSampler"} <= up
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 3 and len({tuple(s["widgets_values"][:2]) for s in samplers}) == 1, "same noise"


def test_every_node_has_a_doc_page():
    ids = our_node_ids()
    missing = sorted(i for i in ids if not (ROOT / "web" / "docs" / f"{i}.md").is_file())
    assert not missing, f"nodes without web/docs/<NodeId>.md: {missing}"
    for i in ids:
        text = (ROOT / "web" / "docs" / f"{i}.md").read_text()
        assert text.startswith("# ") and len(text) > 200, f"{i}.md is not a doc page"


# DOPSDTrainer's widget inputs in the order of its widgets_values (tests/comfyui/test_workflow_builder.py
# checks the files against real ComfyUI's /object_info, which fixes this order).
TRAINER_WIDGETS = ("steps", "gpu_preset", "rank", "lr", "optimizer", "batch_size", "grad_accum", "seed",
                   "checkpointing", "save_every", "preview_every", "run_name", "resume", "k", "teacher", "ema_decay",
                   "loss_weight", "states", "offload", "prior_weight", "prior_batch", "init_lora", "teacher_check", "tensorboard",
                   "adapter", "lokr_factor", "prior_every", "prior_states")
WORKFLOW_FAMILY = {"dopsd_toy_cpu_demo.json": "toy", "dopsd_toy_sft_vs_dopsd.json": "toy",
                   "dopsd_flux2_klein.json": "flux2-klein", "dopsd_z_image_turbo.json": "z-image"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_trainer_values_and_notes_say_what_the_family_spec_says(path):
    """A shipped graph's trainer runs the family's defaults, and its note names no other numbers; no note
    gives advice the nodes refuse (an absolute image folder)."""
    from dopsd_core.family_spec import DEFAULT_PRESET, number_text, spec_named
    spec = spec_named(WORKFLOW_FAMILY[path.name])
    wf = load(path)
    trainers = [n for n in wf["nodes"] if n["type"] == "DOPSDTrainer"]
    assert trainers
    for node in trainers:
        values = dict(zip(TRAINER_WIDGETS, node["widgets_values"]))
        assert len(node["widgets_values"]) == len(TRAINER_WIDGETS)
        assert (values["steps"], values["batch_size"], values["grad_accum"]) == (spec.steps, spec.batch_size,
                                                                                  spec.grad_accum)
        assert (values["prior_weight"], values["prior_batch"], values["k"]) == (spec.prior_weight, spec.prior_batch,
                                                                                 spec.k)
        assert values["rank"] == 0 and values["lr"] == 0.0 and values["gpu_preset"] == DEFAULT_PRESET
        assert (values["states"], values["prior_every"], values["prior_states"]) == (spec.states, spec.prior_every,
                                                                                     spec.prior_states)
    notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in FRONTEND_NODES)
    assert not re.search(r"absolute path|/home/|[A-Z]:\\\\", notes), "a note advises an absolute image folder"
    for m in re.finditer(r"\blr (\S+?),", notes):
        assert m.group(1) == number_text(spec.lr), m.group(0)
    for m in re.finditer(r"rank (\d+) / alpha (\d+)", notes):
        presets = {(p.changes["rank"], p.changes["alpha"]) for p in spec.gpu_presets}
        assert (int(m.group(1)), float(m.group(2))) in {(spec.rank, spec.alpha)} | presets, m.group(0)
    for m in re.finditer(r"(\d+) steps", notes):
        assert int(m.group(1)) in (spec.steps, spec.sample_steps), m.group(0)

"""The built-in toy model through ComfyUI's real executor: dataset -> trainer -> save -> stock loader."""
import json

import pytest
from safetensors.torch import load_file

from comfyui.hostutil import fresh_name, graph, latest_latent, node_error_text

from dopsd_core.toy.render import export_concept_folder


def toy_graph_nodes(data_folder: str, run_name: str, lora_name: str, steps: int = 5):
    """Load toy, build dataset, train, save the LoRA, sample 4 steps with the trained MODEL (stock
    KSampler) and save that latent."""
    return [
        (1, "DOPSDToyModelLoader", {}),
        (2, "DOPSDDataset", {"model": ["1", 0], "folder": data_folder, "caption_template": "a [V]",
                             "resolution": 32, "toy_text_encoder": ["1", 1]}),
        (3, "DOPSDTrainer", {"model": ["1", 0], "dataset": ["2", 0], "steps": steps, "gpu_preset": "family default",
                             "rank": 8, "lr": 1e-3, "optimizer": "adamw", "batch_size": 2, "grad_accum": 1,
                             "seed": 0, "checkpointing": False, "save_every": 2, "preview_every": 2,
                             "run_name": run_name, "resume": False, "k": 4, "teacher": "ema",
                             "ema_decay": 0.9999, "loss_weight": "x0", "states": "all"}),
        (4, "DOPSDSaveLoRA", {"lora": ["3", 1], "name": lora_name, "overwrite": False}),
        (5, "DOPSDToyTextEncode", {"text_encoder": ["1", 1], "text": "a red [V1] on a black background"}),
        (6, "DOPSDToyEmptyLatent", {"batch_size": 2}),
        (7, "KSampler", {"model": ["3", 0], "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0],
                         "latent_image": ["6", 0], "denoise": 1.0}),
        (8, "SaveLatent", {"samples": ["7", 0], "filename_prefix": f"latents/{run_name}_trained"}),
    ]


def stock_loader_nodes(lora_file: str, prefix: str):
    return [
        (1, "DOPSDToyModelLoader", {}),
        (2, "LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": lora_file, "strength_model": 1.0}),
        (5, "DOPSDToyTextEncode", {"text_encoder": ["1", 1], "text": "a red [V1] on a black background"}),
        (6, "DOPSDToyEmptyLatent", {"batch_size": 2}),
        (7, "KSampler", {"model": ["2", 0], "seed": 7, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["5", 0], "negative": ["5", 0],
                         "latent_image": ["6", 0], "denoise": 1.0}),
        (8, "SaveLatent", {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}"}),
    ]


def test_train_save_and_stock_loader_reproduce_the_trained_model(comfy):
    data = comfy.input_dir / "toy_star"
    if not data.exists():
        export_concept_folder("star", data, n=4)
    run, lora = fresh_name("toyrun"), fresh_name("dopsd/toy")
    entry = comfy.run(graph(*toy_graph_nodes("toy_star", run, lora)))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)

    lora_file = comfy.loras_dir / f"{lora}.safetensors"
    sd = load_file(str(lora_file))
    from safetensors import safe_open
    with safe_open(str(lora_file), "pt") as f:
        meta = f.metadata()
    assert meta["dopsd.method"] == "dopsd" and meta["dopsd.model_family"] == "toy" and meta["dopsd.steps"] == "5"
    assert json.loads(meta["dopsd.sigma_grid"]) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert meta["dopsd.k"] == "4" and meta["dopsd.rank"] == "8"
    assert sd and all(k.startswith("diffusion_model.blocks.") for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight")), "LoRA did not train"

    run_dir = comfy.output_dir / "dopsd" / run
    state = json.loads((run_dir / "state" / "state.json").read_text())
    assert state["step"] == 5 and len(state["history"]) == 5 and state["model_family"] == "toy"
    previews = sorted(p.name for p in (run_dir / "previews").glob("*.png"))
    assert previews == ["step_000000.png", "step_000002.png", "step_000004.png", "step_000005.png"]

    entry = comfy.run(graph(*stock_loader_nodes(f"{lora}.safetensors", f"{run}_stock")))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    trained, stock = latest_latent(comfy, f"{run}_trained"), latest_latent(comfy, f"{run}_stock")
    # same weights merged by the same patch mechanism: equal up to float rounding of the merge
    assert trained.shape == stock.shape == (2, 3, 32, 32)
    assert (trained - stock).abs().max().item() < 1e-4

    # the base model (no LoRA) samples differently: the LoRA did change the model
    base = [n for n in stock_loader_nodes("x", f"{run}_base") if n[1] != "LoraLoaderModelOnly"]
    base = [(i, c, {**inp, "model": ["1", 0]} if c == "KSampler" else inp) for i, c, inp in base]
    entry = comfy.run(graph(*base))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    assert (latest_latent(comfy, f"{run}_base") - stock).abs().max().item() > 1e-4


def test_dataset_is_cached_on_disk_by_content(comfy):
    data = comfy.input_dir / "toy_heart_cache"
    export_concept_folder("heart", data, n=2)
    cache_dir = comfy.output_dir / "dopsd" / "cache"
    before = set(cache_dir.glob("*.safetensors")) if cache_dir.exists() else set()
    g = graph((1, "DOPSDToyModelLoader", {}),
              (2, "DOPSDDataset", {"model": ["1", 0], "folder": data.name, "caption_template": "a [V]",
                                   "resolution": 32, "toy_text_encoder": ["1", 1]}),
              (3, "DOPSDTeacherPreview", {"model": ["1", 0], "dataset": ["2", 0], "steps": 4, "seed": 0}),
              (4, "SaveLatent", {"samples": ["3", 0], "filename_prefix": f"latents/{fresh_name('cache')}"}))
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    new = set(cache_dir.glob("*.safetensors")) - before
    assert len(new) == 1
    (data / "heart_00.txt").write_text("a changed caption with [V2]\n")  # new content -> a new cache entry
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    assert len(set(cache_dir.glob("*.safetensors")) - before) == 2


def test_auto_prior_prompts_are_built_and_cached_by_the_dataset_node(comfy):
    """'auto': the captions with the trigger removed (or the class word), the empty prompt and the toy's
    generic prompts; the cache key covers them (another class word, another cached dataset)."""
    from dopsd_core.toy.render import prior_prompts
    data = comfy.input_dir / "toy_star_prior"
    if not data.exists():  # 3 images: no other test's data, so its datasets are cached here first
        export_concept_folder("star", data, n=3)
    cache = comfy.output_dir / "dopsd" / "cache"
    made = []
    for class_word in ("", "shape"):
        before = set(cache.glob("*.safetensors")) if cache.exists() else set()
        run = fresh_name("toyprior")
        g = graph(*toy_graph_nodes("toy_star_prior", run, fresh_name("dopsd/toyprior"), steps=2)[:3])
        g["2"]["inputs"].update(prior_prompts="auto", class_word=class_word)
        g["3"]["inputs"].update(prior_weight=1.0, prior_batch=2)
        entry = comfy.run(g)
        assert entry["status"]["status_str"] == "success", node_error_text(entry)
        (new,) = set(cache.glob("*.safetensors")) - before
        from safetensors import safe_open
        with safe_open(str(new), "pt") as f:
            prior = json.loads(f.metadata()["dopsd.dataset"])["prior"]["captions"]
        made.append(prior)
        state = json.loads((comfy.output_dir / "dopsd" / run / "state" / "state.json").read_text())
        assert state["prior_prompts"] == prior and state["step"] == 2
    plain, worded = made
    assert "" in plain and set(prior_prompts()) <= set(plain)
    assert any(p.startswith("a") and "[V1]" not in p and "shape" not in p for p in plain[:3])
    assert any("shape" in p for p in worded[:3]) and not any("[V1]" in p for p in worded)


def test_init_lora_warm_starts_a_new_run_from_a_lora_in_models_loras(comfy):
    """The trainer's init_lora (ComfyUI Train LoRA's existing_lora): a new run starts from a LoRA file
    picked by name from models/loras; the new LoRA records both concepts."""
    data = comfy.input_dir / "toy_star"
    if not data.exists():
        export_concept_folder("star", data, n=4)
    first, lora = fresh_name("toyfirst"), fresh_name("dopsd/first")
    entry = comfy.run(graph(*toy_graph_nodes("toy_star", first, lora, steps=3)[:4]))
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    second = fresh_name("toysecond")
    g = graph(*toy_graph_nodes("toy_star", second, fresh_name("dopsd/second"), steps=2)[:3])
    g["3"]["inputs"].update(init_lora=f"{lora}.safetensors", rank=8)
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", node_error_text(entry)
    state = json.loads((comfy.output_dir / "dopsd" / second / "state" / "state.json").read_text())
    assert state["init_lora"].endswith(f"{lora}.safetensors") and len(state["concepts"]) == 2
    g["3"]["inputs"].update(init_lora="no_such.safetensors", run_name=fresh_name("toybad"))
    status, body = comfy.post("/prompt", {"prompt": g, "client_id": "dopsd-tests"})  # refused before it runs
    assert status == 400 and "init_lora" in json.dumps(body), body

"""ComfyUI as a library for the `dopsd` CLI: FLUX.2-klein and Z-Image-Turbo trained, sampled and previewed
headless, with no server and no UI, through the same family code the nodes run.

The model files are loaded the way ComfyUI's stock loaders load them (UNETLoader with its weight_dtype,
CLIPLoader with the family's type, VAELoader: the same comfy.sd.load_diffusion_model, load_clip and VAE
calls those nodes make), after checks
that they belong together. A file is named by path, or by its name in that ComfyUI's models/ folders
(extra_model_paths.yaml included), as the loader nodes list it. Everything the run read is recorded in
<run>/comfyui.json, so `--resume RUN` needs no other flag. The dataset (latents and both contexts) is
cached in <run>/dataset/: the CLI writes only into the run folder and the --out of sample/preview.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import DopsdError
from ..family_spec import FamilySpec
from .families import EncoderInputs, Family, detect_family

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's weight_dtype options
TEXT_ENCODER_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
RECORD = "comfyui.json"


# --- ComfyUI, the library -----------------------------------------------------------------------------
def open_comfyui(path: str | None) -> Path:
    """Make the ComfyUI at `path` (or $COMFYUI_PATH) importable, on the CPU when torch sees no GPU, with its
    extra_model_paths.yaml read as main.py reads it. Returns its folder."""
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise DopsdError("this model runs through ComfyUI: pass --comfyui PATH (the folder with ComfyUI's main.py "
                         "and models/) or set COMFYUI_PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file() or not (root / "folder_paths.py").is_file():
        raise DopsdError(f"--comfyui {path} is not a ComfyUI folder (no comfy/model_management.py inside); pass the "
                         "folder that holds ComfyUI's main.py")
    loaded = sys.modules.get("comfy")  # a namespace package: its folder is on __path__
    loaded_root = Path(next(iter(loaded.__path__))).resolve().parent if loaded is not None else None
    if loaded_root is not None and loaded_root != root:
        raise DopsdError(f"this process already imported ComfyUI from {loaded_root}; run dopsd in a fresh "
                         f"process for {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args  # parses no command line when imported as a library (comfy.options)
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    extra = root / "extra_model_paths.yaml"
    if extra.is_file() and loaded is None:
        from utils.extra_config import load_extra_path_config  # ComfyUI's own reader (main.py calls it)
        load_extra_path_config(str(extra))
    return root


def model_file(kind: str, name: str, flag: str) -> Path:
    """A path, or a file name in ComfyUI's models/<kind> folders (what its loader nodes list)."""
    import folder_paths
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    found = folder_paths.get_full_path(kind, name)
    if found:
        return Path(found)
    listed = [f for f in folder_paths.get_filename_list(kind) if f.endswith((".safetensors", ".sft"))]
    where = ", ".join(folder_paths.get_folder_paths(kind))
    hint = f"files there: {', '.join(listed[:8])}" if listed else "none there"
    raise DopsdError(f"{flag} {name}: no such file, and not in {where} ({hint}); pass a path or one of those names")


# --- loading, the stock loaders' way --------------------------------------------------------------------
@dataclass
class ModelFiles:
    """What a headless run loads (recorded in <run>/comfyui.json)."""
    model: str  # the family spec's name
    comfyui: str
    diffusion_model: str
    text_encoder: str
    vae: str
    weight_dtype: str = "default"
    text_encoder_dtype: str = "default"  # fp8_e4m3fn / fp8_e5m2: as ComfyUI's --fp8_e4m3fn-text-enc stores it
    vlm: str | None = None  # Z-Image: the Qwen3-VL-4B-Instruct folder
    vlm_dtype: str = "auto"


@dataclass
class LoadedModels:
    family: Family
    model: object  # comfy ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE
    vlm: object = None  # zimage_vl.VLMHandle

    def encoder_inputs(self) -> EncoderInputs:
        return EncoderInputs(clip=self.clip, vae=self.vae, vlm=self.vlm)


def load_diffusion_model(path: Path, weight_dtype: str):
    """UNETLoader's load: the stored weights, or cast to fp8 on load."""
    import comfy.sd
    options = {"fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
               "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
               "fp8_e5m2": {"dtype": torch.float8_e5m2}}.get(weight_dtype, {})
    try:
        return comfy.sd.load_diffusion_model(str(path), model_options=options)
    except RuntimeError as e:
        raise DopsdError(f"--diffusion-model {path.name}: ComfyUI does not recognise it as a diffusion model "
                         f"({str(e).splitlines()[0]}); pass the FLUX.2-klein or Z-Image-Turbo file from "
                         "models/diffusion_models") from None


def load_text_encoder(path: Path, family: Family, dtype: str = "default"):
    """CLIPLoader's load with the family's type (flux2 / lumina2); dtype fp8_*: stored in fp8, as ComfyUI's
    --fp8_e4m3fn-text-enc / --fp8_e5m2-text-enc store it (half the RAM of klein-9B's 16 GB Qwen3-8B)."""
    import comfy.sd
    import folder_paths
    clip_type = getattr(comfy.sd.CLIPType, family.clip_type.upper())
    options = {"dtype": TEXT_ENCODER_DTYPES[dtype]} if TEXT_ENCODER_DTYPES.get(dtype) is not None else {}
    try:
        return comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=clip_type, model_options=options)
    except Exception as e:  # noqa: BLE001 - ComfyUI raises several kinds for a file it cannot place
        raise DopsdError(f"--text-encoder {path.name}: ComfyUI cannot load it as {family.title}'s text encoder "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass the Qwen3 file from "
                         "models/text_encoders that the model came with") from None


def load_vae(path: Path):
    """VAELoader's load."""
    import comfy.sd
    import comfy.utils
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    try:
        vae = comfy.sd.VAE(sd=sd, metadata=metadata)
        vae.throw_exception_if_invalid()
    except Exception as e:  # noqa: BLE001
        raise DopsdError(f"--vae {path.name}: ComfyUI cannot load it as a VAE ({e}); pass the file from "
                         "models/vae that the model came with") from None
    return vae


def check_model_family(spec: FamilySpec, model, name: str) -> Family:
    """The loaded diffusion model must be of the family --model names."""
    family = detect_family(model.model)  # names the supported families for any other model
    if family.name != spec.name:
        raise DopsdError(f"--diffusion-model {name} is a {family.title} model, not {spec.title}: pass "
                         f"--model {family.name}, or a {spec.title} file")
    return family


def check_text_encoder(family: Family, model, clip, name: str) -> None:
    """The text encoder's context must be as wide as the diffusion model reads (klein-4B takes Qwen3-4B,
    klein-9B Qwen3-8B, Z-Image Qwen3-4B): one encode of the empty prompt says it for any file."""
    want = family.context_width(model.model)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
    if want is not None and cond.shape[-1] != want:
        raise DopsdError(f"--text-encoder {name} gives {cond.shape[-1]}-wide contexts but this {family.title} model "
                         f"reads {want}: pass the text encoder the model came with (klein-4B and Z-Image: "
                         "qwen_3_4b, klein-9B: qwen_3_8b)")


def load_models(spec: FamilySpec, files: ModelFiles, teacher: bool = True) -> LoadedModels:
    """The family's files through the stock loaders' calls, checked: the model is of `spec`'s family, the
    text encoder matches it, Z-Image has its Qwen3-VL folder (teacher: for training and the teacher preview;
    sampling needs none)."""
    if spec.name == "z-image" and teacher and not files.vlm:
        raise DopsdError("Z-Image-Turbo's teacher is the Qwen3-VL splice: pass --vlm with a Qwen3-VL-4B-Instruct "
                         "folder (a path, or its name in ComfyUI's models/dopsd_vlm)")
    if files.weight_dtype not in WEIGHT_DTYPES:
        raise DopsdError(f"--weight-dtype {files.weight_dtype}: pick one of {', '.join(WEIGHT_DTYPES)}")
    if files.text_encoder_dtype not in TEXT_ENCODER_DTYPES:
        raise DopsdError(f"--text-encoder-dtype {files.text_encoder_dtype}: pick one of {', '.join(TEXT_ENCODER_DTYPES)}")
    vlm = vlm_handle(files.vlm, files.vlm_dtype) if files.vlm else None
    model = load_diffusion_model(Path(files.diffusion_model), files.weight_dtype)
    family = check_model_family(spec, model, Path(files.diffusion_model).name)
    clip = load_text_encoder(Path(files.text_encoder), family, files.text_encoder_dtype)
    check_text_encoder(family, model, clip, Path(files.text_encoder).name)
    return LoadedModels(family, model, clip, load_vae(Path(files.vae)), vlm)


def vlm_handle(folder: str, dtype: str):
    from .families import VLM_DTYPES
    from .zimage_vl import VLM_FOLDER_NAME, VLMHandle, check_vlm_folder
    import folder_paths
    path = Path(folder).expanduser()
    if not path.is_dir():
        roots = [Path(folder_paths.models_dir) / VLM_FOLDER_NAME, Path(folder_paths.models_dir) / "LLM"]
        path = next((r / folder for r in roots if (r / folder).is_dir()), path)
    if not path.is_dir():
        raise DopsdError(f"--vlm {folder}: no such folder, and not in ComfyUI's models/{VLM_FOLDER_NAME}; pass the "
                         "Qwen3-VL-4B-Instruct folder (Hugging Face layout)")
    if dtype not in VLM_DTYPES:
        raise DopsdError(f"--vlm-dtype {dtype}: pick one of {', '.join(VLM_DTYPES)}")
    check_vlm_folder(path)
    return VLMHandle(str(path.resolve()), None, dtype)


def files_from_args(spec: FamilySpec, args, root: Path) -> ModelFiles:
    missing = [f for f, v in (("--diffusion-model", args.diffusion_model), ("--text-encoder", args.text_encoder),
                              ("--vae", args.vae)) if not v]
    if missing:
        raise DopsdError(f"{spec.title} needs {', '.join(missing)}: file names in ComfyUI's models/ folders "
                         "(diffusion_models, text_encoders, vae) or paths")
    return ModelFiles(
        model=spec.name, comfyui=str(root),
        diffusion_model=str(model_file("diffusion_models", args.diffusion_model, "--diffusion-model")),
        text_encoder=str(model_file("text_encoders", args.text_encoder, "--text-encoder")),
        vae=str(model_file("vae", args.vae, "--vae")),
        weight_dtype=args.weight_dtype or "default", text_encoder_dtype=args.text_encoder_dtype or "default",
        vlm=args.vlm, vlm_dtype=args.vlm_dtype or "auto")


def save_record(run_dir: Path, files: ModelFiles, resolution: int, aspect_buckets: bool) -> None:
    from ..fileio import save_json
    save_json({**asdict(files), "resolution": resolution, "aspect_buckets": aspect_buckets}, Path(run_dir) / RECORD)


def read_record(run_dir: Path) -> dict | None:
    import json
    p = Path(run_dir) / RECORD
    return json.loads(p.read_text()) if p.is_file() else None


# --- the dataset and the run ------------------------------------------------------------------------------
def build_dataset(models: LoadedModels, items: list, cache_dir: Path,
                  prior_captions: list[str] | None, trigger: str | None, write_cache: bool = True,
                  sample_captions: list[str] | None = None):
    """DOPSDDataset's work: images -> latents and both contexts, cached by content in cache_dir."""
    from .comfy_train import dataset_cache_file, read_cached_dataset, save_dataset
    from .family_dataset import build_family_dataset
    inputs = models.encoder_inputs()
    models.family.check_inputs(inputs)
    cache = dataset_cache_file(cache_dir, models.model, models.family, items, inputs, prior_captions, sample_captions)
    ds = read_cached_dataset(cache)
    if ds is None:
        ds = build_family_dataset(models.family, models.model, items, inputs, prior_captions, sample_captions)
        if write_cache:  # under torchrun every rank encodes; one writes
            save_dataset(ds, cache)
    ds.trigger = trigger
    models.family.release_encoders()
    return ds


def prompt_context(models: LoadedModels, prompt: str, latent_shape: tuple):
    from .comfy import ComfyDenoiser
    cond, extra = models.family.student_encoder(models.encoder_inputs())(prompt)
    return ComfyDenoiser(models.model, models.family).context(cond, extra, torch.zeros(latent_shape))


def with_lora(model, lora_file: Path):
    """The MODEL patched with a LoRA file, as the stock LoraLoaderModelOnly patches it."""
    import comfy.utils

    from .comfy import lora_patches_model
    return lora_patches_model(model, comfy.utils.load_torch_file(str(lora_file), safe_load=True))


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> images [N, H, W, 3] in [0, 1]."""
    return vae.decode(latents).clamp(0, 1)


class FamilyTraining:
    """`dopsd train` for a ComfyUI family: load (a resumed run: the files its comfyui.json names, unless flags
    name others), build or reuse the dataset, then the trainer nodes' training (comfy_train.train)."""

    def __init__(self, args, model: str, cfg, run_dir: Path, data, prior_captions, callbacks, dist, prior_prompts,
                 sample_prompts):
        from ..family_spec import spec_named
        from ..prior import trigger_or_none
        from ..run_folder import check_fresh_out_dir, is_run_folder, read_run_state
        spec = spec_named(model)
        self.args, self.cfg, self.run_dir, self.callbacks, self.dist = args, cfg, Path(run_dir), callbacks, dist
        self.data = Path(data).resolve()
        record = read_record(run_dir) if args.resume else None
        if args.resume and record is None:
            raise DopsdError(f"{run_dir} has no {RECORD} (the model files of the run); pass --comfyui, "
                             "--diffusion-model, --text-encoder and --vae again")
        root = open_comfyui(args.comfyui or (record or {}).get("comfyui"))
        flags = {k: getattr(args, k) for k in ("diffusion_model", "text_encoder", "vae", "weight_dtype",
                                                "text_encoder_dtype", "vlm", "vlm_dtype") if getattr(args, k) is not None}
        if record:  # the run's own files, unless a flag names another (the run folder checks it is the same model)
            names = {f.name for f in fields(ModelFiles)}
            files = ModelFiles(**{**{k: v for k, v in record.items() if k in names}, **flags, "comfyui": str(root)})
            self.resolution = args.resolution or record["resolution"]
            self.buckets = record["aspect_buckets"] if args.aspect_buckets is None else args.aspect_buckets
        else:
            files = files_from_args(spec, args, root)
            self.resolution = args.resolution or spec.resolution
            self.buckets = True if args.aspect_buckets is None else args.aspect_buckets
            if is_run_folder(run_dir):  # said before minutes of loading
                check_fresh_out_dir(run_dir)
        with torch.inference_mode():  # as ComfyUI's executor runs loaders and encoders: no autograd records
            self.models = load_models(spec, files)
        if not args.resume and dist.is_main:
            check_fresh_out_dir(run_dir)  # before anything is written into it
            save_record(run_dir, files, self.resolution, self.buckets)
        from ..data import load_image_folder
        items = load_image_folder(self.data, self.resolution, self.buckets)
        captions = [c for item in items for c in item.captions]
        trigger = args.trigger or trigger_or_none(captions)
        if prior_captions is None:
            prior_captions = prior_prompts(captions, trigger)
        with torch.inference_mode():
            self.dataset = build_dataset(self.models, items, self.run_dir / "dataset", prior_captions, trigger,
                                         write_cache=dist.is_main,
                                         sample_captions=sample_prompts(captions, trigger))
        # the contexts are encoded: the text encoder (8-16 GB of RAM at full size) is not needed again
        self.models.clip = None
        import gc
        gc.collect()
        if dist.is_main:
            callbacks.on_preview = self._save_preview
        self.start_step = int(read_run_state(run_dir)["step"]) if args.resume and is_run_folder(run_dir) else 0
        self.current_step = self.start_step  # the last finished step, for the CLI's messages
        on_step = callbacks.on_step

        def count(info):
            self.current_step = info.step
            if on_step:
                on_step(info)
        callbacks.on_step = count

    @torch.inference_mode()
    def _save_preview(self, step: int, latents: torch.Tensor, _prompts) -> None:
        from ..plot import image_grid, save_png
        images = decode(self.models.vae, self.models.model.model.process_latent_out(latents.float().cpu()))
        save_png(image_grid([images], scale=1), self.run_dir / "previews" / f"step_{step:06d}.png")

    def run(self) -> int:
        from .comfy_train import train
        a = self.args
        _, _, history = train(self.models.model, self.dataset, self.cfg, self.run_dir, self.callbacks,
                              resume=bool(a.resume), init_lora=Path(a.init_lora) if a.init_lora else None,
                              offload=bool(a.offload), teacher_check=a.teacher_check, dist=self.dist,
                              data_dir=str(self.data))
        return len(history) - self.start_step


# --- sample and preview-teacher -------------------------------------------------------------------------
def _load_for_sampling(args, teacher: bool) -> tuple[LoadedModels, Path]:
    from ..family_spec import spec_named
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DopsdError(f"output path {out} is a file; pass a folder for --out")
    spec = spec_named(args.model)
    args.steps = args.steps or spec.sample_steps
    if args.steps < 1 or args.n < 1:
        raise DopsdError("--steps and --n must be >= 1")
    return load_models(spec, files_from_args(spec, args, open_comfyui(args.comfyui)), teacher), out


@torch.inference_mode()
def sample_command(args) -> int:
    """`dopsd sample` for a family: the prompt's few-step samples, with a LoRA if one is given."""
    from ..plot import save_png, to_pil
    from .comfy import sample_latents
    models, out = _load_for_sampling(args, teacher=False)
    fam = models.family
    res = fam.spec.resolution
    shape = fam.latent_shape(models.model.model.latent_format, args.width or res, args.height or res)
    ctx = prompt_context(models, args.prompt, shape)
    model = with_lora(models.model, Path(args.lora)) if args.lora else models.model
    images = decode(models.vae, sample_latents(model, [ctx] * args.n, shape, args.steps, args.seed))
    for i, img in enumerate(images):
        save_png(to_pil(img), out / f"sample_{i:03d}.png")
    print(f"wrote {args.n} samples to {out}")
    return 0


@torch.inference_mode()
def preview_teacher_command(args) -> int:
    """`dopsd preview-teacher` for a family: per training image and caption, the teacher's few-step samples
    beside the target (the dataset is built as for training; nothing is cached)."""
    from ..prior import trigger_or_none
    from ..teacher_check import write_teacher_preview
    from .comfy import sample_latents
    from .family_dataset import build_family_dataset
    from ..data import load_image_folder
    models, out = _load_for_sampling(args, teacher=True)
    items = load_image_folder(Path(args.data), args.resolution or models.family.spec.resolution, True)
    models.family.check_inputs(models.encoder_inputs())
    ds = build_family_dataset(models.family, models.model, items, models.encoder_inputs())
    ds.trigger = trigger_or_none([c for i in items for c in i.captions])
    model = with_lora(models.model, Path(args.init_lora)) if args.init_lora else models.model

    def per_image():
        for r in ds.records:
            shape = tuple(r.x0.shape)
            target = decode(models.vae, models.model.model.process_latent_out(r.x0[None].float()))
            rows = [(caption, target, decode(models.vae, sample_latents(model, [ctx] * args.n, shape, args.steps,
                                                                          args.seed)))
                    for caption, ctx in zip(r.captions, r.teacher_ctx)]
            yield r.name, rows
    write_teacher_preview(per_image(), args.n, out)
    return 0

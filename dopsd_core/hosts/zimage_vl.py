"""Z-Image-Turbo's teacher context: the Qwen3-VL splice (docs/method.md).

A Qwen3-VL-4B-Instruct (Hugging Face folder: config.json, *.safetensors shards, tokenizer and
preprocessor files) gets its language-model weights replaced by Z-Image's Qwen3-4B text-encoder
weights (`model.language_model.<rest>` <- Qwen3 `model.<rest>`), is fed [target image, then caption]
as one user turn, and hidden layer -2 is the teacher's cross-attention context: [1, T, 2560], the
layout of ComfyUI's Z-Image CONDITIONING (its Qwen3-4B encoder returns the output of decoder layer
N-2, without the final norm, as float32: comfy/text_encoders/z_image.py `Qwen3_4BModel`).

transformers and safetensors are imported lazily; nothing here imports ComfyUI at module level.
Weights are read only from safetensors (never pickle).
"""
from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..errors import DopsdError

VLM_FOLDER_NAME = "dopsd_vlm"  # ComfyUI: models/dopsd_vlm/<Qwen3-VL-4B-Instruct folder>
MIN_SIDE, MAX_SIDE, MAX_IMAGE_TOKENS = 512, 768, 1024  # image area 512²–768² px, ≤ 1024 image tokens (docs/method.md)
FIX_HINT = ("put Qwen/Qwen3-VL-4B-Instruct (config.json, model-*.safetensors, tokenizer and preprocessor "
            "files, as downloaded from Hugging Face) into a folder under ComfyUI/models/dopsd_vlm/")

# The Qwen-style chat template, used only when the folder ships none (tiny test folders). The real
# Qwen3-VL-4B-Instruct template yields the same text for one user turn [image, caption].
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# ComfyUI's key prefixes in front of the Qwen3 `model.<rest>` keys: a loaded CLIP's state dict
# (`qwen3_4b.transformer.model.…`, SD1ClipModel name + SDClipModel.transformer), all-in-one
# checkpoints (`text_encoders.qwen3_4b.transformer.model.…`), standalone files (`model.…`).
_QWEN3_KEY = re.compile(r"^(?:.*\.)?model\.((?:embed_tokens|norm|layers\.\d+)\..+)$")
_QUANT_AUX = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale", "scaled_fp8")
_LM_PREFIX = "model.language_model."


@dataclass(frozen=True)
class VLMHandle:
    """What the dataset build needs for Z-Image's teacher contexts (no weights held): the folder, where the
    Qwen3-4B weights come from, the precision."""
    folder: str
    text_encoder_file: str | None  # None: splice from the dataset's CLIP
    dtype: str


# --- the folder --------------------------------------------------------------------------------------
def find_vlm_folders(roots: Iterable[str | Path], depth: int = 2) -> list[str]:
    """Sub-folders (up to `depth` levels) of the roots that hold a config.json, as names relative to
    their root (what the loader node lists)."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        level = [root]
        for _ in range(depth):
            nxt = []
            for d in level:
                for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    if (sub / "config.json").is_file():
                        found.append(sub.relative_to(root).as_posix())
                    else:
                        nxt.append(sub)
            level = nxt
    return sorted(set(found))


def check_vlm_folder(folder: str | Path) -> dict:
    """The folder's config if it is a usable Qwen3-VL folder; otherwise a DopsdError naming what is
    missing and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DopsdError(f"Qwen3-VL folder {folder} does not exist; {FIX_HINT}")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise DopsdError(f"{folder} has no config.json, so it is not a Hugging Face model folder; {FIX_HINT}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DopsdError(f"{cfg_file} is not readable JSON ({e}); download the folder again") from None
    if cfg.get("model_type") != "qwen3_vl":
        raise DopsdError(f"{folder} holds a '{cfg.get('model_type')}' model, not Qwen3-VL (model_type qwen3_vl); "
                         f"the Z-Image teacher needs Qwen3-VL-4B-Instruct: {FIX_HINT}")
    if not list(folder.glob("*.safetensors")):
        names = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
        raise DopsdError(f"{folder} has no .safetensors weights (found: {names}); only safetensors are loaded "
                         f"(never pickled .bin files): {FIX_HINT}")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise DopsdError(f"{folder} has no tokenizer files (tokenizer.json / vocab.json); {FIX_HINT}")
    if not (folder / "preprocessor_config.json").is_file():
        raise DopsdError(f"{folder} has no preprocessor_config.json (the image processor); {FIX_HINT}")
    return cfg


# --- the text-encoder source -------------------------------------------------------------------------
class _Source:
    """Qwen3 text-encoder tensors under their `model.<rest>` names, read lazily (one at a time from a
    safetensors file, or by reference from an in-memory state dict)."""

    def __init__(self, names: dict[str, str], get: Callable[[str], torch.Tensor], raw_keys: list[str]):
        self.names = names  # normalised Qwen3 key -> raw key
        self._get = get
        self.raw_keys = raw_keys
        self._raw_set = set(raw_keys)

    def tensor(self, key: str) -> torch.Tensor:
        raw = self.names[key]
        t = self._get(raw)
        if "Quantized" in type(t).__name__ and hasattr(t, "dequantize"):
            t = t.dequantize()  # ComfyUI QuantizedTensor (fp8 / mixed-precision text encoders)
        if t.dtype in _FP8_DTYPES:
            scale_key = raw[: -len("weight")] + "weight_scale" if raw.endswith("weight") else None
            t = t.float()
            if scale_key and scale_key in self._raw_set:
                scale = self._get(scale_key).float()
                if scale.numel() != 1:
                    raise DopsdError(f"{raw} uses a block-scaled quantisation this splice cannot read; "
                                     "use the bf16/fp16 qwen_3_4b text encoder file instead")
                t = t * scale
        elif t.dtype in (torch.uint8, torch.int8) and raw.endswith("weight"):
            raise DopsdError(f"{raw} is stored packed ({t.dtype}, e.g. NVFP4); the splice needs a bf16/fp16/fp8 "
                             "Qwen3-4B text encoder: load qwen_3_4b.safetensors instead")
        return t


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


def qwen3_key(raw: str) -> str | None:
    """`model.<rest>` for a Qwen3 text-encoder key in any of ComfyUI's layouts, or None."""
    if raw.endswith(_QUANT_AUX):
        return None
    m = _QWEN3_KEY.match(raw)
    return f"model.{m.group(1)}" if m else None


def open_source(source: Any) -> _Source:
    """source: a ComfyUI CLIP object (its cond_stage_model state dict), a path to a .safetensors text
    encoder file, or a state dict."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix != ".safetensors" or not path.is_file():
            raise DopsdError(f"text encoder file {path} is not an existing .safetensors file; pick Z-Image's "
                             "qwen_3_4b.safetensors (models/text_encoders)")
        from safetensors import safe_open
        handle = safe_open(str(path), framework="pt", device="cpu")
        raw_keys = list(handle.keys())
        get = handle.get_tensor
    else:
        if isinstance(source, Mapping):
            sd = source
        elif hasattr(source, "cond_stage_model"):  # ComfyUI CLIP
            sd = source.cond_stage_model.state_dict()
        elif hasattr(source, "state_dict"):
            sd = source.state_dict()
        else:
            raise DopsdError(f"cannot read text-encoder weights from a {type(source).__name__}; connect the "
                             "Z-Image CLIP (qwen_3_4b) or pick its file")
        raw_keys = list(sd.keys())
        get = sd.__getitem__
    names = {}
    for raw in raw_keys:
        k = qwen3_key(raw)
        if k is not None and k not in names:
            names[k] = raw
    return _Source(names, get, raw_keys)


# --- the splice --------------------------------------------------------------------------------------
@dataclass
class SpliceReport:
    """matched: language-model keys of the VLM filled from the text encoder. unmatched: VLM language-model
    keys the text encoder does not have (they would keep Qwen3-VL's own weights). shape_mismatch: same
    name, different shape (not copied). unused: text-encoder keys the VLM has no place for."""
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched) + len(self.shape_mismatch)

    @property
    def fraction(self) -> float:
        return len(self.matched) / max(1, self.total)

    def summary(self) -> str:
        s = (f"Qwen3-VL splice: {len(self.matched)}/{self.total} language-model tensors replaced by the Z-Image "
             f"text encoder; {len(self.unmatched)} not in the text encoder, {len(self.shape_mismatch)} shape "
             f"mismatches, {len(self.unused)} text-encoder tensors unused")
        if self.unmatched:
            s += f"; missing e.g. {', '.join(self.unmatched[:3])}"
        if self.shape_mismatch:
            k, a, b = self.shape_mismatch[0]
            s += f"; e.g. {k}: VLM {list(a)} vs text encoder {list(b)}"
        if self.unused:
            s += f"; unused e.g. {', '.join(self.unused[:3])}"
        return s

    def to_dict(self) -> dict:
        return {"matched": len(self.matched), "total": self.total, "unmatched": self.unmatched,
                "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch], "unused": self.unused}


def splice_language_model(model: torch.nn.Module, source: Any, min_match: float = 1.0) -> SpliceReport:
    """Copy the Qwen3 text encoder's weights into the Qwen3-VL's language model, in place
    (`model.language_model.<rest>` <- `model.<rest>`), cast to the VLM's dtype. Raises DopsdError when
    fewer than `min_match` of the language-model tensors were replaced (default: all of them)."""
    src = open_source(source)
    report = SpliceReport()
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(_LM_PREFIX)}
    if not targets:
        raise DopsdError(f"the loaded {type(model).__name__} has no '{_LM_PREFIX}*' weights; is this a Qwen3-VL?")
    used = set()
    with torch.no_grad():
        for key, dst in targets.items():
            skey = "model." + key[len(_LM_PREFIX):]
            if skey not in src.names:
                report.unmatched.append(key)
                continue
            t = src.tensor(skey)
            used.add(skey)
            if tuple(t.shape) != tuple(dst.shape):
                report.shape_mismatch.append((key, tuple(dst.shape), tuple(t.shape)))
                continue
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
            report.matched.append(key)
            del t
    report.unused = sorted(k for k in src.names if k not in used)
    report.unused += sorted(r for r in src.raw_keys if qwen3_key(r) is None and not r.endswith(_QUANT_AUX)
                            and not r.endswith("logit_scale"))  # e.g. lm_head; SDClipModel's own logit_scale
    if report.fraction < min_match or not report.matched:
        hint = ("the text encoder has no Qwen3 'model.layers.*' weights at all; connect Z-Image's CLIP "
                "(CLIPLoader, qwen_3_4b, type lumina2) or pick its .safetensors file"
                if not report.matched else
                "the text encoder is not Z-Image's Qwen3-4B or the VLM is not Qwen3-VL-4B-Instruct (the 4B "
                "pair has identical names and shapes); use qwen_3_4b with Qwen/Qwen3-VL-4B-Instruct")
        raise DopsdError(f"{report.summary()}. Too few matched ({report.fraction:.0%} < {min_match:.0%}): {hint}")
    return report


# --- inputs ------------------------------------------------------------------------------------------
@dataclass
class VLProcessor:
    """What encoding needs from a Qwen3-VL processor: a tokenizer, an image processor and the chat
    template. transformers' Qwen3VLProcessor has the same attributes and can be passed instead (it
    needs torchvision for its video processor; this one does not)."""
    tokenizer: Any
    image_processor: Any
    chat_template: str


def load_processor(folder: str | Path) -> VLProcessor:
    from transformers import AutoImageProcessor, AutoTokenizer
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    try:
        ip = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (ImportError, ValueError, OSError):  # e.g. the torchvision ("fast") class without torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        keep = ("patch_size", "temporal_patch_size", "merge_size", "size", "image_mean", "image_std")
        ip = Qwen2VLImageProcessorPil(**{k: cfg[k] for k in keep if k in cfg})
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    template = template or getattr(tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return VLProcessor(tok, ip, template)


def target_size(h: int, w: int, factor: int = 32, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE,
                max_tokens: int = MAX_IMAGE_TOKENS) -> tuple[int, int]:
    """(H, W): the aspect ratio kept, the area brought into [min_side², max_side²], both sides multiples
    of `factor` (patch × merge: one image token per factor² pixels), at most max_tokens tokens."""
    area = h * w
    scale = math.sqrt(min(max(area, min_side ** 2), max_side ** 2) / area)
    hh = max(factor, round(h * scale / factor) * factor)
    ww = max(factor, round(w * scale / factor) * factor)
    while (hh // factor) * (ww // factor) > max_tokens or hh * ww > max_side ** 2 * 1.07:
        if hh >= ww:
            hh -= factor
        else:
            ww -= factor
    return hh, ww


def prepare_image(image, processor) -> "Image.Image":
    """A [3, H, W] float tensor in [0, 1] (or a PIL image) -> RGB PIL image at target_size."""
    from PIL import Image
    if torch.is_tensor(image):
        arr = (image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        img = Image.fromarray(arr, "RGB")
    else:
        img = image.convert("RGB")
    ip = processor.image_processor
    factor = int(getattr(ip, "patch_size", 16)) * int(getattr(ip, "merge_size", 2))
    hh, ww = target_size(img.height, img.width, factor)
    return img.resize((ww, hh), Image.BICUBIC)


def build_inputs(processor, caption: str, image=None) -> dict[str, torch.Tensor]:
    """Model inputs for one user turn [image, caption] (caption only when image is None): the chat
    template's text with the image placeholder expanded to one <|image_pad|> per merged patch."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": caption}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                   chat_template=processor.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
    out = {}
    if image is not None:
        img = prepare_image(image, processor)
        ip = processor.image_processor
        factor = int(getattr(ip, "patch_size", 16)) * int(getattr(ip, "merge_size", 2))
        # bounds that keep prepare_image's size (it is already within them and a multiple of factor)
        vis = ip(images=[img], size={"shortest_edge": factor * factor,
                                     "longest_edge": MAX_IMAGE_TOKENS * factor * factor}, return_tensors="pt")
        grid = vis["image_grid_thw"]
        n_tokens = int(grid[0].prod()) // int(getattr(ip, "merge_size", 2)) ** 2
        if text.count("<|image_pad|>") != 1:
            raise DopsdError("the VLM's chat template did not produce exactly one <|image_pad|> for the image; "
                             "use the chat template shipped with Qwen3-VL-4B-Instruct")
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
        out.update(pixel_values=vis["pixel_values"], image_grid_thw=grid)
    enc = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out["mm_token_type_ids"] = (out["input_ids"] == image_id).to(torch.int32)
    return out


# --- loading and encoding ----------------------------------------------------------------------------
def load_vlm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Qwen3VLForConditionalGeneration from a Hugging Face folder (safetensors only), on the CPU."""
    check_vlm_folder(folder)
    from transformers import Qwen3VLForConditionalGeneration
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(folder), use_safetensors=True, dtype=dtype,
                                                                local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DopsdError(f"could not load Qwen3-VL from {folder}: {e}; {FIX_HINT}") from None
    return model.eval().requires_grad_(False)


def _forward_kwargs(model) -> set[str]:
    import inspect
    return set(inspect.signature(model.model.forward).parameters)


@torch.no_grad()
def encode(model, processor, caption: str, image=None, layer: int = -2) -> torch.Tensor:
    """Hidden layer `layer` (default −2, as Z-Image's Qwen3 encoder) of the whole sequence for one user
    turn [image, caption], as float32 [1, T, hidden] on the CPU: ComfyUI's Z-Image cross-attention context."""
    inputs = build_inputs(processor, caption, image)
    accepted = _forward_kwargs(model)
    device = next(model.parameters()).device
    kw = {k: v.to(device) for k, v in inputs.items() if k in accepted}
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(next(model.model.visual.parameters()).dtype)
    out = model.model(**kw, output_hidden_states=True, use_cache=False, return_dict=True)
    return out.hidden_states[layer].float().cpu()


class ZImageVLEncoder:
    """Load the Qwen3-VL, splice in Z-Image's text encoder, encode, unload:

        with ZImageVLEncoder(folder, clip_or_file) as enc:
            feats = enc.encode(image, caption)            # [1, T, 2560] float32
    """

    def __init__(self, folder: str | Path, te_source: Any, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, processor=None, min_match: float = 1.0, log=print):
        self.folder, self.te_source, self.device = Path(folder), te_source, torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.processor, self.min_match, self.log = processor, min_match, log
        self.model = None
        self.report: SpliceReport | None = None

    def __enter__(self) -> "ZImageVLEncoder":
        check_vlm_folder(self.folder)
        if self.processor is None:
            self.processor = load_processor(self.folder)
        self.model = load_vlm(self.folder, self.dtype)
        try:
            self.report = splice_language_model(self.model, self.te_source, self.min_match)
        except BaseException:
            self.unload()
            raise
        if self.log:
            self.log(f"[D-OPSD] {self.report.summary()}")
        self.model.to(self.device)
        return self

    def encode(self, image, caption: str) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("ZImageVLEncoder is not loaded; use it as a context manager")
        return encode(self.model, self.processor, caption, image)

    def teacher(self):
        """teacher_context(caption, latent, item) for comfy_train.build_dataset."""
        def teacher(caption: str, latent: torch.Tensor, item):
            return self.encode(item.image, caption), {}
        return teacher

    def unload(self) -> None:
        self.model = None  # the last reference: the weights are freed here
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __exit__(self, *exc) -> None:
        self.unload()


def build_zimage_dataset(model_patcher, items, encode_text, vae, vlm_folder, te_source, device="cpu",
                         dtype=None, free_memory: Callable[[], None] | None = None, log=print,
                         prior_captions: list[str] | None = None, sample_captions: list[str] | None = None):
    """Z-Image dataset: the student contexts from the CLIP (encode_text) for every caption first, then
    free_memory() (e.g. ComfyUI unloading the CLIP), then the Qwen3-VL splice for the teacher contexts,
    unloaded afterwards. Returns (dataset, splice report)."""
    from .comfy_train import build_dataset
    check_vlm_folder(vlm_folder)
    student = {}
    for cap in [c for item in items for c in item.captions] + list(prior_captions or []) + list(sample_captions or []):
        if cap not in student:
            student[cap] = encode_text(cap)
    if free_memory:
        free_memory()
    with ZImageVLEncoder(vlm_folder, te_source, device, dtype, log=log) as enc:
        ds = build_dataset(model_patcher, items, student.__getitem__, enc.teacher(), vae=vae,
                           prior_captions=prior_captions, sample_captions=sample_captions)
        report = enc.report
    return ds, report

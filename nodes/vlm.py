"""DOPSDQwen3VLLoader: picks the Qwen3-VL-4B-Instruct folder for Z-Image's teacher (the Qwen3-VL splice, docs/method.md).

The node only validates and hands a small handle on; the weights are loaded, spliced, used and
unloaded by DOPSDDataset (dopsd_core.hosts.zimage_vl) while it builds the teacher contexts.
"""
from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from ..dopsd_core.errors import DopsdError
from ..dopsd_core.hosts.zimage_vl import VLM_FOLDER_NAME, VLMHandle, check_vlm_folder, find_vlm_folders

VLM = io.Custom("DOPSD_VLM")
FROM_CLIP = "(the clip input of D-OPSD Dataset)"
NONE_FOUND = f"(no folder in models/{VLM_FOLDER_NAME})"
DTYPES = ["auto", "bf16", "fp16", "fp32"]


def register_folder() -> None:
    """models/dopsd_vlm (and models/LLM, where other VLM packs keep Hugging Face folders), listed as
    'dopsd_vlm' in folder_paths (extra_model_paths.yaml can add more)."""
    import folder_paths
    if VLM_FOLDER_NAME not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(VLM_FOLDER_NAME, os.path.join(folder_paths.models_dir, VLM_FOLDER_NAME),
                                           is_default=True)
        folder_paths.add_model_folder_path(VLM_FOLDER_NAME, os.path.join(folder_paths.models_dir, "LLM"))


def vlm_roots() -> list[str]:
    import folder_paths
    register_folder()
    return folder_paths.get_folder_paths(VLM_FOLDER_NAME)


def resolve_vlm(name: str) -> Path:
    """The folder a listed name refers to, or a clear error (nothing listed, folder gone, path escape)."""
    roots = vlm_roots()
    if not name or name == NONE_FOUND:
        raise DopsdError(f"no Qwen3-VL folder found in {', '.join(roots)}: download Qwen/Qwen3-VL-4B-Instruct "
                         f"(Hugging Face layout) into ComfyUI/models/{VLM_FOLDER_NAME}/Qwen3-VL-4B-Instruct, then "
                         "refresh the node list (press R)")
    for root in roots:
        path = (Path(root) / name).resolve()
        if Path(root).resolve() in path.parents and path.is_dir():
            return path
    raise DopsdError(f"Qwen3-VL folder '{name}' is not in {', '.join(roots)} (moved or deleted?); put "
                     f"Qwen3-VL-4B-Instruct into models/{VLM_FOLDER_NAME}/ and pick it again")


class DOPSDQwen3VLLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths
        names = find_vlm_folders(vlm_roots()) or [NONE_FOUND]
        te_files = [FROM_CLIP] + [f for f in folder_paths.get_filename_list("text_encoders")
                                  if f.endswith(".safetensors")]
        return io.Schema(
            node_id="DOPSDQwen3VLLoader", display_name="D-OPSD Qwen3-VL Loader (Z-Image teacher)", category="D-OPSD",
            description="Z-Image-Turbo's D-OPSD teacher: a Qwen3-VL-4B-Instruct whose language model is replaced by "
                        "Z-Image's Qwen3-4B text encoder, fed [target image, caption]. Connect to D-OPSD Dataset.",
            inputs=[
                io.Combo.Input("vlm_folder", options=names, default=names[0],
                               tooltip=f"A Qwen/Qwen3-VL-4B-Instruct folder in Hugging Face layout (config.json, "
                                       f"*.safetensors, tokenizer and preprocessor files) under "
                                       f"ComfyUI/models/{VLM_FOLDER_NAME}/ (or models/LLM/). Only safetensors are "
                                       "loaded. Its language-model weights are replaced, so any Qwen3-VL-4B-Instruct "
                                       "download works."),
                io.Combo.Input("text_encoder", options=te_files, default=FROM_CLIP,
                               tooltip="Where Z-Image's Qwen3-4B weights come from: the CLIP connected to D-OPSD "
                                       "Dataset (default), or a file in models/text_encoders (qwen_3_4b).")
                ,
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="Precision of the Qwen3-VL while it encodes (auto: bf16 on GPU, fp32 on CPU). "
                                       "It is unloaded as soon as the teacher contexts are cached."),
            ],
            outputs=[VLM.Output(display_name="VLM")],
        )

    @classmethod
    def execute(cls, vlm_folder, text_encoder, dtype):
        import folder_paths
        folder = resolve_vlm(vlm_folder)
        check_vlm_folder(folder)
        te_file = None
        if text_encoder != FROM_CLIP:
            te_file = folder_paths.get_full_path("text_encoders", text_encoder)
            if te_file is None:
                raise DopsdError(f"text encoder file '{text_encoder}' is not in models/text_encoders; pick it again")
        return io.NodeOutput(VLMHandle(str(folder), te_file, dtype))


NODES = [DOPSDQwen3VLLoader]

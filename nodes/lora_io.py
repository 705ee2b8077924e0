"""DOPSDSaveLoRA (into ComfyUI's loras folder) and DOPSDLossPlot."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..dopsd_core.errors import DopsdError
from ..dopsd_core.fileio import save_tensors
from ..dopsd_core.plot import loss_plot
from .paths import lora_file_inside


def loras_root() -> Path:
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def lora_path(name: str) -> Path:
    """models/loras/<name>.safetensors; plain names only (sub-folders allowed), never outside loras/."""
    return lora_file_inside(name, loras_root())


class DOPSDSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDSaveLoRA", display_name="D-OPSD Save LoRA", category="D-OPSD", is_output_node=True,
            description="Writes the LoRA into models/loras (atomic), where the stock LoRA loaders list it.",
            inputs=[io.LoraModel.Input("lora", tooltip="LORA from a D-OPSD trainer."),
                    io.String.Input("name", default="dopsd/my_concept",
                                    tooltip="File name under models/loras (no extension)."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name.")],
            outputs=[io.String.Output(display_name="path"),
                     # "*" (any): ComfyUI's validation accepts it into a stock loader's list-typed lora_name,
                     # a COMBO output is refused there (received_type COMBO vs the options list)
                     io.AnyType.Output(display_name="lora_name",
                                       tooltip="The file's name as the stock LoRA loaders list it: connect it to "
                                               "LoraLoaderModelOnly's lora_name to load it in the same run.")],
        )

    @classmethod
    def execute(cls, lora, name, overwrite):
        path = lora_path(name)
        if path.exists() and not overwrite:
            raise DopsdError(f"{path.name} already exists in loras; choose another name or turn overwrite on")
        meta = {**getattr(lora, "metadata", {}), "dopsd.saved_by": "DOPSDSaveLoRA"}
        save_tensors(lora, path, meta)
        listed = path.relative_to(Path(loras_root())).as_posix()
        return io.NodeOutput(str(path), listed, ui=ui.PreviewText(f"saved {path}"))


class DOPSDLossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDLossPlot", display_name="D-OPSD Loss Plot", category="D-OPSD",
            inputs=[io.LossMap.Input("loss", tooltip="LOSS from a D-OPSD trainer."),
                    io.Boolean.Input("log_scale", default=True, tooltip="Logarithmic loss axis.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, loss, log_scale):
        img = loss_plot(list(loss["loss"]), log_scale=log_scale, title="D-OPSD")
        return io.NodeOutput(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None])


NODES = [DOPSDSaveLoRA, DOPSDLossPlot]

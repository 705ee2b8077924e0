"""The ComfyExtension listing every node of the pack."""
from comfy_api.latest import ComfyExtension

from . import dataset, live, lora_io, sample, toy, train, vlm


class DopsdExtension(ComfyExtension):
    async def on_load(self):
        live.register_routes()  # before ComfyUI adds its routes to the app (custom nodes load first)

    async def get_node_list(self):
        return [*toy.NODES, *dataset.NODES, *vlm.NODES, *train.NODES, *sample.NODES, *lora_io.NODES]

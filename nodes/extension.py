"""The ComfyExtension listing every node of the pack."""
from comfy_api.latest import ComfyExtension

from . import dataset, lora_io, sample, toy, train


class DopsdExtension(ComfyExtension):
    async def get_node_list(self):
        return [*toy.NODES, *dataset.NODES, *train.NODES, *sample.NODES, *lora_io.NODES]

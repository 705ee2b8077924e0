"""ComfyUI entry point of the ComfyUI-D-OPSD node pack.

Imports nothing at module level: outside ComfyUI (pytest, the CLI) this file is inert. ComfyUI
imports the pack folder as a package and calls `comfy_entrypoint`, which loads the nodes lazily
with relative imports (ComfyUI has its own top-level `nodes` module).
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import DopsdExtension
    return DopsdExtension()

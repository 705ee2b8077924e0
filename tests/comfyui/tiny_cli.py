"""`dopsd` with the tiny test models in place of its file loading, for host tests that start the CLI as a
process (torchrun). Usage: python tests/comfyui/tiny_cli.py train --model flux2-klein --diffusion-model
<the tiny klein file> ... -- every argument as for `dopsd`.

Only `headless.load_models` is replaced, by what the test node pack builds in the server (same builders,
same seeds; the klein DiT still comes from its file through the CLI's own UNETLoader call). Everything
else -- ComfyUI imported as a library, the dataset, the trainer, torchrun's ranks -- is the CLI's.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the comfyui.* helpers


def tiny_family_models(family: str, klein_file: Path, vlm_folder: Path | None):
    """The node graphs' tiny loaders (test_family_graphs.loaders, seed 0) as the CLI's LoadedModels."""
    import torch

    from comfyui.testing_nodes import tiny_models
    from dopsd_core.family_spec import spec_named
    from dopsd_core.hosts import headless
    from dopsd_core.hosts.zimage_vl import VLMHandle
    with torch.inference_mode():  # as the executor runs loaders: inference tensors
        if family == "flux2-klein":
            model = headless.load_diffusion_model(Path(klein_file), "default")  # the CLI's own file load
            vae = tiny_models.tiny_vae("flux2", 0 + 1)
        else:
            model = tiny_models.tiny_zimage(0)
            vae = tiny_models.tiny_vae("flux", 0 + 1)
        clip = tiny_models.tiny_text_encoder(family, 0 + 5)  # DOPSDTestTinyCLIP's seed offset
    fam = headless.check_model_family(spec_named(family), model, "tiny")
    return headless.LoadedModels(fam, model, clip, vae, VLMHandle(str(vlm_folder), None, "auto") if vlm_folder else None)


def main(argv: list[str]) -> int:
    from dopsd_core import cli
    from dopsd_core.hosts import headless

    def load_models(spec, files, teacher=True):
        return tiny_family_models(spec.name, Path(files.diffusion_model), Path(files.vlm) if files.vlm else None)
    headless.load_models = load_models
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

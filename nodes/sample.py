"""DOPSDFewStepSampler (before/after) and DOPSDTeacherPreview: the family's few-step Euler sampler."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..dopsd_core.errors import DopsdError
from .dataset import Dataset


def _sample(model, contexts, latent_shape, steps, seed):
    from ..dopsd_core.hosts.comfy import sample_latents
    return sample_latents(model, contexts, latent_shape, steps, seed)


class DOPSDFewStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDFewStepSampler", display_name="D-OPSD Few-Step Sampler", category="D-OPSD",
            description="Few-step Euler samples on the family's grid with fixed seeds; with a second model, "
                        "returns before (first half) and after (second half) on the same noise.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (before)."),
                io.Conditioning.Input("positive", tooltip="The prompt (a [V] prompt shows the concept)."),
                io.Int.Input("steps", default=0, min=0, max=100, tooltip="Sampling steps; 0 = the family default."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Samples per model."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             control_after_generate=io.ControlAfterGenerate.fixed, tooltip="Seed of the initial noise."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16, tooltip="Image width (toy: 32)."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16, tooltip="Image height (toy: 32)."),
                io.Model.Input("model_after", optional=True, tooltip="The trained model (after)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, steps, batch_size, seed, width, height, model_after=None):
        from ..dopsd_core.hosts.comfy import ComfyDenoiser
        from ..dopsd_core.hosts.families import detect_family
        family = detect_family(model.model)
        steps = steps or family.sample_steps
        shape = family.latent_shape(model.model.latent_format, width, height)
        if len(positive) != 1:
            raise DopsdError("connect one prompt (a single CONDITIONING entry) to positive")
        cond, extra = positive[0][0], dict(positive[0][1])
        den = ComfyDenoiser(model, family)
        ctx = den.context(cond, extra, torch.zeros(shape))
        out = [_sample(m, [ctx] * batch_size, shape, steps, seed) for m in [model] + ([model_after] if model_after else [])]
        return io.NodeOutput({"samples": torch.cat(out)})


class DOPSDTeacherPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DOPSDTeacherPreview", display_name="D-OPSD Teacher Preview", category="D-OPSD",
            description="Few-step samples of the teacher context (caption + target image) before training. "
                        "The student cannot exceed its teacher: check that these show the concept.",
            inputs=[io.Model.Input("model", tooltip="The base model."),
                    Dataset.Input("dataset", tooltip="From D-OPSD Dataset."),
                    io.Int.Input("steps", default=0, min=0, max=100, tooltip="Sampling steps; 0 = family default."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             control_after_generate=io.ControlAfterGenerate.fixed, tooltip="Seed of the initial noise.")],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, dataset, steps, seed):
        from ..dopsd_core.hosts.families import check_same_family
        steps = steps or check_same_family(model, dataset).sample_steps
        shapes = {tuple(r.x0.shape) for r in dataset.records}
        out = []
        for shape in sorted(shapes):  # one batch per latent size (aspect buckets)
            ctxs = [r.teacher_ctx[0] for r in dataset.records if tuple(r.x0.shape) == shape]
            out.append(_sample(model, ctxs, shape, steps, seed))
        if len(out) > 1:
            raise DopsdError("teacher preview of mixed image sizes: build the dataset at one resolution")
        return io.NodeOutput({"samples": out[0]})


NODES = [DOPSDFewStepSampler, DOPSDTeacherPreview]

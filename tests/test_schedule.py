"""Sigma schedules: ComfyUI's `simple` grid."""
import pytest

from dopsd_core.schedule import comfy_simple_sigmas


def test_four_step_grid_is_comfyui_simple_at_shift_3():
    assert comfy_simple_sigmas(3.0, 4) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert comfy_simple_sigmas(3.0, 2) == pytest.approx([1.0, 0.75, 0.0], abs=1e-6)

"""plot.py: the EMA, loss.csv + loss.png, the loss curve's axes, image grids and to_pil."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_core.plot import image_grid, loss_plot, save_png, smooth, to_pil, write_loss_files

RAW, EMA = (160, 190, 230), (20, 60, 160)  # loss_plot's colours


def test_smooth_is_an_exponential_moving_average_starting_at_the_first_value():
    assert smooth([]) == []
    assert smooth([4.0]) == [4.0]
    got = smooth([1.0, 3.0, 3.0], alpha=0.5)
    assert got == pytest.approx([1.0, 2.0, 2.5])
    # a constant series stays constant; alpha 0 follows the raw values
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    assert smooth([1.0, 5.0, -2.0], alpha=0.0) == [1.0, 5.0, -2.0]


def test_loss_files_have_one_row_per_step_and_a_png(tmp_path):
    history = [0.5, 0.25, 0.125123456789, 1e-9, 3.0]
    write_loss_files(history, tmp_path / "run", title="dopsd toy")
    lines = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(s) for s, _ in rows] == [1, 2, 3, 4, 5]
    for (_, v), want in zip(rows, history):
        assert float(v) == pytest.approx(want, rel=1e-7)
    with Image.open(tmp_path / "run" / "loss.png") as im:
        assert im.format == "PNG" and im.size == (640, 360)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["loss.csv", "loss.png"]


def test_loss_files_keep_non_finite_steps_and_rewrite_in_place(tmp_path):
    write_loss_files([1.0, 0.5], tmp_path)
    write_loss_files([1.0, float("nan"), 0.5], tmp_path)
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and rows[1].startswith("2,") and math.isnan(float(rows[1].split(",")[1]))
    write_loss_files([], tmp_path)
    assert (tmp_path / "loss.csv").read_text() == "step,loss\n"


def _colour_rows(img, x, colour):
    a = np.asarray(img)
    return np.nonzero(np.all(a[:, x] == colour, axis=-1))[0]


def test_loss_curve_uses_a_log_axis_for_positive_losses():
    """Plot box: x 60..625, y 25..330. The middle point of [1, 10, 100] sits half way up on a log
    axis, and (10 - 1) / (100 - 1) of the way up on a linear one."""
    history = [1.0, 10.0, 100.0]
    x_mid = 342  # 60 + 565 / 2
    log_rows = _colour_rows(loss_plot(history), x_mid, RAW)
    lin_rows = _colour_rows(loss_plot(history, log_scale=False), x_mid, RAW)
    assert len(log_rows) and len(lin_rows)
    assert abs(log_rows.mean() - (330 - 305 * 0.5)) < 4
    assert abs(lin_rows.mean() - (330 - 305 * 9 / 99)) < 4
    # a non-positive value falls back to the linear axis
    zero_rows = _colour_rows(loss_plot([0.0, 10.0, 20.0]), x_mid, RAW)
    assert abs(zero_rows.mean() - (330 - 305 * 0.5)) < 4


def test_loss_curve_draws_both_series_only_for_finite_values():
    a = np.asarray(loss_plot([3.0, 2.0, 1.5, 1.0]))
    assert np.all(a == RAW, axis=-1).any() and np.all(a == EMA, axis=-1).any()
    for history in ([], [float("nan"), float("inf")], [2.0]):  # nothing to draw a line through
        a = np.asarray(loss_plot(history))
        assert not np.all(a == RAW, axis=-1).any() and not np.all(a == EMA, axis=-1).any()
    assert loss_plot([1.0], width=200, height=100).size == (200, 100)


def test_to_pil_maps_unit_floats_to_bytes_and_clamps():
    levels = torch.arange(256, dtype=torch.float32) / 255
    img = levels.view(16, 16, 1).expand(16, 16, 3)
    got = np.asarray(to_pil(img))
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    assert np.array_equal(got[..., 0].reshape(-1), np.arange(256))  # k / 255 -> k exactly
    back = torch.from_numpy(got.astype(np.float32) / 255)
    assert torch.allclose(back, img, atol=1e-6)
    out = np.asarray(to_pil(torch.tensor([[[-0.5, 1.5, 0.5]]])))
    assert out.tolist() == [[[0, 255, 128]]]  # clamped to [0, 1]; 127.5 rounds to 128


@pytest.mark.parametrize("n,rows,h,w,scale,pad", [(3, 2, 4, 5, 1, 2), (1, 1, 8, 8, 4, 0), (4, 3, 2, 3, 2, 5)])
def test_grid_size_follows_rows_columns_scale_and_padding(n, rows, h, w, scale, pad):
    tensors = [torch.rand(n, h, w, 3) for _ in range(rows)]
    grid = image_grid(tensors, scale=scale, pad=pad)
    assert grid.size == (n * (w * scale + pad) + pad, rows * (h * scale + pad) + pad)


def test_grid_places_each_tile_scaled_with_white_padding():
    colours = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]])
    rows = [colours[r][:, None, None, :].expand(2, 3, 4, 3) for r in range(2)]  # solid tiles 3 x 4
    scale, pad = 2, 3
    a = np.asarray(image_grid(rows, scale=scale, pad=pad))
    h, w = 3 * scale, 4 * scale
    for r in range(2):
        for i in range(2):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            tile = a[y:y + h, x:x + w]
            assert np.all(tile == (colours[r, i] * 255).to(torch.uint8).numpy()), (r, i)
    assert np.all(a[:pad] == 255) and np.all(a[:, :pad] == 255)  # the border
    assert np.all(a[:, pad + w:pad + w + pad] == 255)  # the gap between columns


def test_grid_scaling_is_nearest_neighbour():
    tile = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])  # 1 x 2: black, white
    a = np.asarray(image_grid([tile[None]], scale=3, pad=0))
    assert a.shape == (3, 6, 3)
    assert np.all(a[:, :3] == 0) and np.all(a[:, 3:] == 255)


def test_save_png_round_trips_pixels(tmp_path):
    img = to_pil(torch.rand(5, 7, 3))
    save_png(img, tmp_path / "s" / "x.png")
    with Image.open(tmp_path / "s" / "x.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img))

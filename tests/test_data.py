"""Image folders: captions, image modes and formats, centre crops and aspect buckets, refusals, fingerprints."""
import pytest
import torch
from PIL import Image

from dopsd_core.data import folder_fingerprint, load_image_folder
from dopsd_core.errors import DopsdError


def test_captions_variants_and_other_files(image_folder):
    (image_folder / "notes.md").write_text("ignored")
    (image_folder / "orphan.txt").write_text("a caption without an image is ignored")
    items = load_image_folder(image_folder, 32)
    assert [i.name for i in items] == ["img0.png", "img1.png", "img2.png"]
    assert items[0].captions == ["a red [V] on a black background", "a [V]"]  # blank line dropped
    assert items[0].image.shape == (3, 32, 32) and items[0].image.dtype == torch.float32
    assert 0.0 <= items[0].image.min() and items[0].image.max() <= 1.0


def test_modes_and_formats_become_rgb_and_are_centre_cropped(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rgba = Image.new("RGBA", (64, 32), (255, 0, 0, 128))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # a blue left quarter: cropped away by the centre crop
    rgba.save(d / "a.png")
    Image.new("L", (50, 80), 200).save(d / "b.jpg")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(d / "c.webp")
    for n in "abc":
        (d / f"{n}.txt").write_text("x")
    items = {i.name: i.image for i in load_image_folder(d, 16)}
    assert all(im.shape == (3, 16, 16) for im in items.values())
    assert items["a.png"][2].max() < 0.1 and items["a.png"][0].min() > 0.9  # red only, blue strip cropped
    assert torch.allclose(items["b.jpg"][0], items["b.jpg"][1])  # grey -> equal channels
    assert items["c.webp"][1].mean() > 0.9


def test_bad_folders_name_problem_and_fix(tmp_path, image_folder):
    with pytest.raises(DopsdError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(DopsdError, match="has no images"):
        load_image_folder(empty, 32)
    (image_folder / "img1.txt").unlink()
    with pytest.raises(DopsdError, match=r"img1\.png has no caption file img1\.txt"):
        load_image_folder(image_folder, 32)
    (image_folder / "img1.txt").write_text("  \n\n")
    with pytest.raises(DopsdError, match=r"img1\.txt is blank"):
        load_image_folder(image_folder, 32)
    (image_folder / "img1.txt").write_text("ok")
    (image_folder / "img2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DopsdError, match=r"img2\.png cannot be decoded"):
        load_image_folder(image_folder, 32)


def test_fingerprint_follows_content(image_folder):
    a = folder_fingerprint(image_folder)
    (image_folder / "img0.txt").write_text("another caption")
    assert folder_fingerprint(image_folder) != a


@pytest.mark.parametrize("size, want", [
    ((1024, 1024), (1024, 1024)),  # square stays square
    ((1536, 1024), (1280, 832)),   # 3:2 landscape: about 1024² pixels, sides multiples of 64
    ((1024, 1536), (832, 1280)),   # and its portrait twin
    ((4000, 1000), (1472, 704)),   # 4:1 is clamped to 2:1
])
def test_bucket_size_keeps_aspect_and_area(size, want):
    from dopsd_core.data import bucket_size
    w, h = bucket_size(*size, 1024)
    assert (w, h) == want and w % 64 == 0 and h % 64 == 0
    assert 0.85 < w * h / 1024**2 < 1.1


def test_bucketed_folder_keeps_the_whole_wide_image(tmp_path):
    """With buckets a 2:1 image is not cropped to a square: both coloured halves survive."""
    d = tmp_path / "b"
    d.mkdir()
    im = Image.new("RGB", (256, 128), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 32, 128))  # a blue left eighth: a square crop would cut it off
    im.save(d / "wide.png")
    Image.new("RGB", (128, 128), (0, 255, 0)).save(d / "square.png")
    for n in ("wide", "square"):
        (d / f"{n}.txt").write_text("a [V]")
    items = {i.name: i.image for i in load_image_folder(d, 128, buckets=True)}
    assert items["wide.png"].shape == (3, 96, 176)  # area ~128², sides multiples of 16, ratio 1.83
    assert items["wide.png"][2, :, :8].mean() > 0.9  # the blue strip is there
    assert items["square.png"].shape == (3, 128, 128)
    cropped = {i.name: i.image for i in load_image_folder(d, 128)}
    assert cropped["wide.png"].shape == (3, 128, 128) and cropped["wide.png"][2].max() < 0.1

"""hosts/comfy_train.py without ComfyUI: the dataset cache round-trips through safetensors + JSON, and its
key follows the content."""
import torch

from dopsd_core.data import ImageItem
from dopsd_core.denoiser import Record
from dopsd_core.hosts.comfy import ComfyContext
from dopsd_core.hosts.comfy_train import (ComfyDataset, dataset_cache_key, load_dataset, read_cached_dataset,
                                          save_dataset)


def test_dataset_cache_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 8, 8, generator=g)
    s = ComfyContext({"c_crossattn": torch.randn(1, 7, 64, generator=g)})
    t = ComfyContext({"c_crossattn": torch.randn(1, 9, 64, generator=g), "ref_latents": [x0[None].clone()],
                      "ref_latents_method": "index"})
    ds = ComfyDataset("z-image", [Record("a.png", x0, ["a [V]", "the [V]"], [s, s], [t, t])], [s], ["a [V]"])
    path = tmp_path / "cache.safetensors"
    save_dataset(ds, path)
    back = load_dataset(path)
    assert back.family == "z-image" and back.preview_captions == ["a [V]"]
    r = back.records[0]
    assert r.name == "a.png" and r.captions == ["a [V]", "the [V]"] and torch.equal(r.x0, x0)
    assert torch.equal(r.student_ctx[1].kwargs["c_crossattn"], s.kwargs["c_crossattn"])
    assert torch.equal(r.teacher_ctx[0].kwargs["ref_latents"][0], x0[None])
    assert r.teacher_ctx[0].kwargs["ref_latents_method"] == "index"


def test_cache_key_follows_content():
    items = [ImageItem("a", torch.zeros(3, 4, 4), ["a [V]"])]
    k = dataset_cache_key("toy", "m", "e", items)
    assert k == dataset_cache_key("toy", "m", "e", [ImageItem("a", torch.zeros(3, 4, 4), ["a [V]"])])
    assert k != dataset_cache_key("toy", "m", "e", [ImageItem("a", torch.ones(3, 4, 4), ["a [V]"])])
    assert k != dataset_cache_key("toy", "m", "e", [ImageItem("a", torch.zeros(3, 4, 4), ["b [V]"])])
    assert k != dataset_cache_key("toy", "other model", "e", items)


def test_a_cache_entry_is_whole_or_absent(tmp_path, monkeypatch):
    """An interrupted write leaves no entry; a file cut short is rebuilt (None), never half used."""
    import safetensors.torch

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 8, 8, generator=g)
    c = ComfyContext({"c_crossattn": torch.randn(1, 7, 64, generator=g)})
    ds = ComfyDataset("flux2-klein", [Record(f"{i}.png", x0 + i, ["a [V]"], [c], [c]) for i in range(3)], [c], ["a [V]"])
    path = tmp_path / "cache" / "key.safetensors"
    assert read_cached_dataset(path) is None

    class Interrupted(Exception):
        pass
    real = safetensors.torch.save_file

    def cut(tensors, filename, metadata=None):  # the write dies half-way
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise Interrupted()
    monkeypatch.setattr(safetensors.torch, "save_file", cut)
    monkeypatch.setattr("dopsd_core.fileio.save_file", cut)
    try:
        save_dataset(ds, path)
    except Interrupted:
        pass
    monkeypatch.undo()
    assert not path.exists() and list(path.parent.iterdir()) == []  # no entry, no temp file left

    save_dataset(ds, path)
    assert [r.name for r in read_cached_dataset(path).records] == ["0.png", "1.png", "2.png"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    assert read_cached_dataset(path) is None
    path.write_bytes(b"not a safetensors file")
    assert read_cached_dataset(path) is None

"""fileio.py: atomic safetensors/JSON/bytes writes, their permissions, metadata, shared storage."""
import json
import os
import stat

import pytest
import torch

from dopsd_core import fileio
from dopsd_core.fileio import load_tensors, save_bytes, save_json, save_tensors


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _only(folder, *names):
    """The folder holds exactly these files: no temporary file was left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_tensors_and_metadata_round_trip(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
          "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0)}
    meta = {"dopsd.rank": "4", "dopsd.concepts": json.dumps([{"trigger": "[V]", "captions": ["a [V]"]}])}
    save_tensors(sd, tmp_path / "sub" / "x.safetensors", meta)  # the parent folder is created
    got, got_meta = load_tensors(tmp_path / "sub" / "x.safetensors")
    assert got.keys() == sd.keys()
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k])
    assert got_meta == meta
    _only(tmp_path / "sub", "x.safetensors")


def test_no_metadata_loads_as_an_empty_dict(tmp_path):
    save_tensors({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    assert load_tensors(tmp_path / "x.safetensors")[1] == {}


def test_non_contiguous_and_grad_tensors_are_saved(tmp_path):
    w = torch.randn(4, 3, requires_grad=True)
    sd = {"t": torch.randn(3, 5).t(), "w": w}
    save_tensors(sd, tmp_path / "x.safetensors")
    got, _ = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(got["t"], sd["t"]) and torch.equal(got["w"], w.detach())


def test_tensors_sharing_a_pointer_are_cloned_and_saved(tmp_path):
    t = torch.arange(12.0).reshape(3, 4)
    sd = {"a": t, "same": t, "flat": t.view(12), "head": t[0:1]}
    save_tensors(sd, tmp_path / "x.safetensors")
    got, _ = load_tensors(tmp_path / "x.safetensors")
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    got["a"][0, 0] = 100.0  # loaded tensors are independent copies
    assert got["same"][0, 0] == 0.0 and got["flat"][0] == 0.0
    assert t[0, 0] == 0.0  # the caller's tensors are untouched


def test_tensors_sharing_storage_at_another_offset_are_saved(tmp_path):
    t = torch.arange(12.0).reshape(3, 4)
    sd = {"all": t, "tail": t[1:]}
    save_tensors(sd, tmp_path / "x.safetensors")
    got, _ = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(got["all"], t) and torch.equal(got["tail"], t[1:])


def _partial_then_fail(exc):
    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise exc
    return fail


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_tensor_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, exc):
    path = tmp_path / "lora.safetensors"
    save_tensors({"a": torch.ones(3)}, path, {"v": "1"})
    before = path.read_bytes()
    monkeypatch.setattr(fileio, "save_file", _partial_then_fail(exc))
    with pytest.raises(type(exc)):
        save_tensors({"a": torch.zeros(3)}, path, {"v": "2"})
    assert path.read_bytes() == before
    got, meta = load_tensors(path)
    assert torch.equal(got["a"], torch.ones(3)) and meta == {"v": "1"}
    _only(tmp_path, "lora.safetensors")


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "save_file", _partial_then_fail(OSError("no space")))
    with pytest.raises(OSError):
        save_tensors({"a": torch.ones(3)}, tmp_path / "x.safetensors")
    _only(tmp_path)


def test_failed_json_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_json({"step": 1, "history": [0.5]}, path)
    before = path.read_text()
    assert json.loads(before) == {"step": 1, "history": [0.5]}

    def dump(obj, f, **kw):
        f.write('{"step": 2, "hist')
        raise ValueError("boom")
    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(ValueError):
        save_json({"step": 2}, path)
    assert path.read_text() == before
    _only(tmp_path, "state.json")


def test_unserialisable_json_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.json"
    save_json({"ok": True}, path)
    with pytest.raises(TypeError):
        save_json({"bad": object()}, path)  # json.dump fails after writing part of the object
    assert json.loads(path.read_text()) == {"ok": True}
    _only(tmp_path, "state.json")


def test_failed_bytes_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "loss.csv"
    save_bytes(b"step,loss\n1,0.5\n", path)
    with pytest.raises(TypeError):
        save_bytes("not bytes", path)
    assert path.read_bytes() == b"step,loss\n1,0.5\n"
    _only(tmp_path, "loss.csv")

    def fsync(fd):  # fails after the new content was written in full
        raise OSError("I/O error")
    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(OSError):
        save_bytes(b"step,loss\n1,0.5\n2,0.4\n", path)
    assert path.read_bytes() == b"step,loss\n1,0.5\n"
    _only(tmp_path, "loss.csv")


def test_successful_saves_replace_the_content(tmp_path):
    save_bytes(b"one", tmp_path / "f.bin")
    save_bytes(b"two!", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == b"two!"
    save_json([1, 2], tmp_path / "f.json")
    save_json({"a": "b"}, tmp_path / "f.json")
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": "b"}
    _only(tmp_path, "f.bin", "f.json")


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp creates 0600; the saved files must get 0666 minus the process umask, like open()."""
    (tmp_path / "plain").write_bytes(b"")
    want = _mode(tmp_path / "plain")
    umask = os.umask(0)
    os.umask(umask)
    assert want == 0o666 & ~umask
    save_tensors({"a": torch.ones(1)}, tmp_path / "x.safetensors")
    save_json({"a": 1}, tmp_path / "x.json")
    save_bytes(b"x", tmp_path / "x.bin")
    for name in ("x.safetensors", "x.json", "x.bin"):
        assert _mode(tmp_path / name) == want, name
    if umask & 0o044 == 0:  # the usual umasks (022, 002): others can read what a run writes
        assert all(_mode(tmp_path / n) & 0o044 == 0o044 for n in ("x.safetensors", "x.json", "x.bin"))


def test_replacing_a_private_file_gives_the_normal_mode(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    (tmp_path / "plain").write_bytes(b"")
    save_json({"a": 1}, path)
    assert _mode(path) == _mode(tmp_path / "plain")


@pytest.mark.parametrize("hard_links", [True, False])
def test_link_file_gives_a_second_name_that_later_saves_do_not_touch(tmp_path, monkeypatch, hard_links):
    from dopsd_core.fileio import link_file
    if not hard_links:  # a filesystem without hard links: a copy, still atomic
        def no_link(*_):
            raise OSError("no hard links here")
        monkeypatch.setattr("os.link", no_link)
    src, dst = tmp_path / "gen" / "a.safetensors", tmp_path / "a-1.safetensors"
    save_tensors({"w": torch.ones(3)}, src)
    dst.write_bytes(b"old")
    link_file(src, dst)
    assert torch.equal(load_tensors(dst)[0]["w"], torch.ones(3))
    assert (os.stat(src).st_ino == os.stat(dst).st_ino) == hard_links
    save_tensors({"w": torch.zeros(3)}, src)  # the next save replaces src; the linked name keeps its data
    assert torch.equal(load_tensors(dst)[0]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.safetensors", "gen"]  # no temporary left

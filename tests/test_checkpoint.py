"""Checkpoint readers (every format gives the same tensors) and the streaming safetensors writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import helpers
from cmerge.io import (SAFETENSORS_INDEX, TORCH_INDEX, StreamingSafetensorsWriter, content_hash,
                               copy_aux_files, open_source, parse_size, plan_shards, write_sharded)
from cmerge.errors import CmergeError


def reference_tensors():
    sd = helpers.tiny_base(seed=5)
    sd["half.weight"] = torch.randn(3, 4, dtype=torch.float64).to(torch.float16)
    sd["bf.weight"] = torch.randn(5, dtype=torch.float64).to(torch.bfloat16)
    sd["scalar"] = torch.tensor(2.5)
    sd["mask"] = torch.tensor([True, False, True])
    return sd


def split(sd):
    names = sorted(sd)
    return {n: sd[n] for n in names[: len(names) // 2]}, {n: sd[n] for n in names[len(names) // 2:]}


def write_formats(sd, root: Path) -> dict[str, object]:
    """The same tensors in every format cmerge reads."""
    out: dict[str, object] = {}
    (root / "hf_st").mkdir(parents=True)
    save_file(sd, str(root / "hf_st" / "model.safetensors"))
    (root / "hf_st" / "config.json").write_text("{}")
    out["hf folder, model.safetensors"] = root / "hf_st"

    (root / "hf_st_sharded").mkdir()
    a, b = split(sd)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for f, part in zip(files, (a, b)):
        save_file(part, str(root / "hf_st_sharded" / f))
    wm = {n: files[0] for n in a} | {n: files[1] for n in b}
    (root / "hf_st_sharded" / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    out["hf folder, sharded safetensors"] = root / "hf_st_sharded"

    (root / "hf_bin").mkdir()
    torch.save(sd, root / "hf_bin" / "pytorch_model.bin")
    out["hf folder, pytorch_model.bin"] = root / "hf_bin"

    (root / "hf_bin_sharded").mkdir()
    bfiles = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    for f, part in zip(bfiles, (a, b)):
        torch.save(part, root / "hf_bin_sharded" / f)
    bwm = {n: bfiles[0] for n in a} | {n: bfiles[1] for n in b}
    (root / "hf_bin_sharded" / TORCH_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": bwm}))
    out["hf folder, sharded .bin"] = root / "hf_bin_sharded"

    save_file(sd, str(root / "single.safetensors"))
    out["single .safetensors"] = root / "single.safetensors"
    torch.save(sd, root / "single.pt")
    out["single .pt"] = root / "single.pt"
    torch.save({"state_dict": sd, "epoch": 3}, root / "lightning.ckpt")
    out["checkpoint dict with state_dict"] = root / "lightning.ckpt"
    torch.save(sd, root / "weights.bin")
    out["single .bin"] = root / "weights.bin"
    out["state dict"] = {n: t.clone() for n, t in sd.items()}
    out["state dict, str path"] = str(root / "single.safetensors")
    return out


def test_every_reader_gives_the_same_tensors(tmp_path):
    sd = reference_tensors()
    hashes = set()
    for what, model in write_formats(sd, tmp_path).items():
        src = open_source(model)
        assert src.keys() == sorted(sd), what
        for n, t in sd.items():
            got = src.get(n)
            assert got.dtype == t.dtype and got.shape == t.shape, (what, n)
            assert torch.equal(got, t), (what, n)
            assert src.meta(n).shape == tuple(t.shape) and src.meta(n).dtype == t.dtype
        hashes.add(content_hash(src))
    assert len(hashes) == 1  # the content hash does not depend on the file format


def test_module_reader():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    src = open_source(net)
    want = net.state_dict()
    assert src.keys() == sorted(want)
    assert all(torch.equal(src.get(n), want[n]) for n in want)
    assert src.meta("1.num_batches_tracked").dtype == torch.int64
    assert content_hash(src) == content_hash(open_source(dict(want)))


def test_folder_metadata(tmp_path):
    sd = reference_tensors()
    models = write_formats(sd, tmp_path)
    assert open_source(models["hf folder, model.safetensors"]).folder == tmp_path / "hf_st"
    assert open_source(models["hf folder, sharded .bin"]).folder == tmp_path / "hf_bin_sharded"
    assert open_source(models["single .pt"]).folder is None


def test_hash_changes_with_any_byte(tmp_path):
    sd = reference_tensors()
    h0 = content_hash(open_source(sd))
    sd2 = dict(sd)
    w = sd2["head.weight"].clone()
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(10.0))
    sd2["head.weight"] = w
    assert content_hash(open_source(sd2)) != h0
    sd3 = dict(sd)
    sd3["renamed.weight"] = sd3.pop("head.weight")
    assert content_hash(open_source(sd3)) != h0


@pytest.mark.parametrize("bad, fragment", [
    ("missing", "does not exist"),
    ("unknown_suffix", "unknown weight file type"),
    ("empty_folder", "holds no model weights"),
    ("garbage_safetensors", "not a valid safetensors"),
    ("garbage_pt", "not a readable torch checkpoint"),
    ("not_tensors", "does not hold a state dict"),
    ("pickled_objects", "other than tensors"),
    ("bad_index", "not a valid shard index"),
    ("missing_shard", "does not exist"),
])
def test_unreadable_inputs_raise_one_sentence(tmp_path, bad, fragment):
    if bad == "missing":
        path = tmp_path / "nope.safetensors"
    elif bad == "unknown_suffix":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"x")
    elif bad == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    elif bad == "garbage_safetensors":
        path = tmp_path / "g.safetensors"
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    elif bad == "garbage_pt":
        path = tmp_path / "g.pt"
        path.write_bytes(b"definitely not a zip file")
    elif bad == "not_tensors":
        path = tmp_path / "list.pt"
        torch.save([torch.zeros(2)], path)
    elif bad == "pickled_objects":
        path = tmp_path / "objects.pt"
        torch.save({"w": torch.zeros(2), "cfg": Opaque()}, path)
    elif bad == "bad_index":
        path = tmp_path / "idx"
        path.mkdir()
        (path / SAFETENSORS_INDEX).write_text("{not json")
    else:
        path = tmp_path / "idx2"
        path.mkdir()
        (path / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CmergeError, match=fragment) as info:
        open_source(path)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)  # one plain sentence


class Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""


def test_cannot_read_other_objects():
    with pytest.raises(CmergeError, match="cannot read a model"):
        open_source(42)
    with pytest.raises(CmergeError, match="not a tensor"):
        open_source({"a": [1, 2]})


# ---------------------------------------------------------------- writing

def specs_of(sd):
    return [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]


def test_streaming_writer_reads_back(tmp_path):
    sd = reference_tensors()
    sd["transposed"] = torch.randn(4, 6).T  # not contiguous
    sd["empty"] = torch.zeros(0, 3)
    path = tmp_path / "out.safetensors"
    w = StreamingSafetensorsWriter(path, specs_of(sd), {"format": "pt", "note": "hello"})
    for n, t in sd.items():
        w.write(n, t)
    w.close()
    with safe_open(str(path), framework="pt") as h:
        assert h.metadata() == {"format": "pt", "note": "hello"}
        assert sorted(h.keys()) == sorted(sd)
        for n, t in sd.items():
            got = h.get_tensor(n)
            assert got.dtype == t.dtype and torch.equal(got, t), n
    assert set(load_file(str(path))) == set(sd)
    # the header is padded to a multiple of 8 bytes (the format requires aligned data)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_streaming_writer_refuses_out_of_order_and_incomplete(tmp_path):
    sd = {"a": torch.zeros(2), "b": torch.ones(3)}
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs_of(sd))
    with pytest.raises(ValueError):
        w.write("b", sd["b"])
    with pytest.raises(ValueError):
        w.write("a", sd["a"].double())
    w.write("a", sd["a"])
    with pytest.raises(ValueError, match="only 1 of 2"):
        w.close()


def test_plan_shards_respects_the_limit():
    specs = [("a", torch.float32, (10,)), ("b", torch.float32, (100,)), ("c", torch.float32, (5,)),
             ("d", torch.float32, (5,))]
    shards = plan_shards(specs, 60)
    assert [[s[0] for s in sh] for sh in shards] == [["a"], ["b"], ["c", "d"]]
    assert [[s[0] for s in sh] for sh in plan_shards(specs, 10**6)] == [["a", "b", "c", "d"]]


def test_write_sharded_round_trip(tmp_path):
    sd = reference_tensors()
    specs = specs_of(sd)
    one = tmp_path / "one"
    one.mkdir()
    assert write_sharded(one, specs, iter(sd.items()), 10**9) == [one / "model.safetensors"]
    many = tmp_path / "many"
    many.mkdir()
    files = write_sharded(many, specs, iter(sd.items()), 600)
    assert len(files) > 2
    index = json.loads((many / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    for folder in (one, many):
        back = helpers.load_safetensors_dir(folder)
        assert set(back) == set(sd) and all(torch.equal(back[n], sd[n]) for n in sd)
        src = open_source(folder)
        assert all(torch.equal(src.get(n), sd[n]) for n in sd)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1234") == 1234
    for bad in ("lots", "-1MB", "0"):
        with pytest.raises(CmergeError):
            parse_size(bad)


def test_copy_aux_files_skips_weights_and_readme(tmp_path):
    src = tmp_path / "src"
    (src / "tok").mkdir(parents=True)
    (src / "tok" / "vocab.txt").write_text("a\n")
    (src / "config.json").write_text("{}")
    (src / "README.md").write_text("old card")
    (src / "model.safetensors").write_bytes(b"")
    (src / SAFETENSORS_INDEX).write_text("{}")
    (src / ".hidden").write_text("")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_aux_files(src, dst)
    assert sorted(copied) == ["config.json", "tok/"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tok"]

"""A corpus of bad inputs, built on the fly: each is refused with one sentence and changes nothing.

For every case, through the CLI and through the Python API: exit status 2 (or a
CmergeError), exactly one line on stderr that names the file (or tensor) and the cause,
no traceback, and the merge state's files byte-identical before and after (for `init`:
no state folder left behind; for an export: no output folder).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import helpers
from cmerge import CmergeError, init_state, open_state
from cmerge.config import load_config


@dataclass
class Bad:
    """A refused command: the CLI arguments, what the one line must contain, and the same through Python."""

    args: list
    fragments: tuple[str, ...]
    api: Callable[[], object]
    creates: list[Path] = field(default_factory=list)  # paths that must not exist afterwards


@dataclass
class Env:
    root: Path
    base: Path            # the base model file
    state: Path           # a state with one step (task arithmetic)
    good: dict            # a good expert's tensors (not merged yet)
    base_sd: dict


def raw_safetensors(path: Path, header: bytes | dict, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file written byte by byte, so its header can be wrong in any way."""
    h = json.dumps(header).encode() if isinstance(header, dict) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len))
        f.write(h)
        f.write(data)
    return path


def add(env: Env, model, *fragments, extra=(), **api_kw) -> Bad:
    return Bad(["add", env.state, model, *extra, "-q"], fragments,
               lambda: open_state(env.state).add(model, **api_kw))


def with_tensor(env: Env, name: str, value: torch.Tensor, path: str = "m.safetensors", drop: str | None = None) -> Path:
    sd = dict(env.good)
    if drop:
        del sd[drop]
    else:
        sd[name] = value
    return helpers.save_model(sd, env.root / path)


def st_header(n=4) -> dict:
    return {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}


# ---------------------------------------------------------------- the cases

def missing_path(env):
    return add(env, env.root / "nowhere.safetensors", "nowhere.safetensors", "does not exist")


def empty_file(env):
    p = env.root / "empty.safetensors"
    p.write_bytes(b"")
    return add(env, p, "empty.safetensors", "not a valid safetensors file", "header too small")


def header_length_past_end(env):
    p = raw_safetensors(env.root / "hlen.safetensors", st_header(), bytes(16), header_len=10 ** 6)
    return add(env, p, "hlen.safetensors", "invalid header length")


def header_not_json(env):
    p = raw_safetensors(env.root / "nojson.safetensors", b"not json", bytes(16))
    return add(env, p, "nojson.safetensors", "invalid JSON in header")


def overlapping_offsets(env):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    return add(env, raw_safetensors(env.root / "overlap.safetensors", h, bytes(24)), "overlap.safetensors",
               "invalid offset for tensor")


def offsets_out_of_range(env):
    h = {"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}
    return add(env, raw_safetensors(env.root / "range.safetensors", h, bytes(64)), "range.safetensors",
               "file not fully covered")


def dtype_length_mismatch(env):
    h = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}
    return add(env, raw_safetensors(env.root / "len.safetensors", h, bytes(16)), "len.safetensors",
               "invalid shape, data type, or offset")


def duplicate_names(env):
    h = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}'
    return add(env, raw_safetensors(env.root / "dup.safetensors", h, bytes(32)), "dup.safetensors",
               "invalid offset for tensor")


def non_utf8_name(env):
    h = '{"\xff":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.encode("latin-1")
    return add(env, raw_safetensors(env.root / "utf.safetensors", h, bytes(16)), "utf.safetensors", "invalid UTF-8")


def unknown_dtype_code(env):
    h = {"a": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}
    return add(env, raw_safetensors(env.root / "dtype.safetensors", h, bytes(16)), "dtype.safetensors",
               "unknown variant `X99`")


def dtype_cmerge_cannot_merge(env):
    h = {"a": {"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 16]}}
    return add(env, raw_safetensors(env.root / "f8.safetensors", h, bytes(16)), "f8.safetensors",
               "unsupported dtype F8_E4M3")


def truncated_data(env):
    p = helpers.save_model(env.good, env.root / "trunc.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 40)
    return add(env, p, "trunc.safetensors", "not a valid safetensors file")


class Stranger:
    """Something a torch checkpoint may carry besides tensors (an optimizer, a config object)."""


def pickle_with_objects(env):
    p = env.root / "objects.bin"
    torch.save({"w": torch.ones(2), "extra": Stranger()}, p)
    return add(env, p, "objects.bin", "other than tensors")


def random_bytes_bin(env):
    p = env.root / "noise.bin"
    p.write_bytes(os.urandom(256))
    return add(env, p, "noise.bin", "not a readable torch checkpoint")


def unknown_suffix(env):
    p = env.root / "weights.txt"
    p.write_text("hello")
    return add(env, p, "weights.txt", "unknown weight file type")


def folder_without_weights(env):
    d = env.root / "empty_folder"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return add(env, d, "empty_folder", "holds no model weights")


def _sharded(env, name) -> Path:
    d = env.root / name
    d.mkdir()
    names = sorted(env.good)
    half = len(names) // 2
    save_file({n: env.good[n].contiguous() for n in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: env.good[n].contiguous() for n in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def shard_missing(env):
    d = _sharded(env, "shards_missing")
    (d / "model-00002-of-00002.safetensors").unlink()
    return add(env, d, "model-00002-of-00002.safetensors", "does not exist")


def tensor_in_the_wrong_shard(env):
    d = _sharded(env, "shards_wrong")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = sorted(env.good)[0]
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return add(env, d, "shards_wrong", name, "but it is in model-00001-of-00002.safetensors")


def index_not_json(env):
    d = _sharded(env, "shards_badindex")
    (d / "model.safetensors.index.json").write_text("{oops")
    return add(env, d, "model.safetensors.index.json", "not a valid shard index")


def symlink_loop(env):
    a, b = env.root / "loop_a.safetensors", env.root / "loop_b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    return add(env, a, "loop_a.safetensors", "loop of symbolic links")


def unreadable_file(env):
    d = env.root / "dir_as_file"
    d.mkdir()
    (d / "model.safetensors").mkdir()  # a folder where the weights file should be: cannot be read
    return add(env, d, "model.safetensors", "not a valid safetensors file")


def nan_value(env):
    w = env.good["layers.0.mlp.up.weight"].clone()
    w[1, 2] = float("nan")
    return add(env, with_tensor(env, "layers.0.mlp.up.weight", w, "nan.safetensors"), "nan.safetensors",
               "layers.0.mlp.up.weight", "NaN or Inf")


def inf_value(env):
    w = env.good["layers.1.norm.weight"].clone()
    w[0] = float("-inf")
    return add(env, with_tensor(env, "layers.1.norm.weight", w, "inf.safetensors"), "inf.safetensors",
               "layers.1.norm.weight", "NaN or Inf")


def value_beyond_float32(env):
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in env.good.items()}
    sd["head.weight"] = sd["head.weight"].clone()
    sd["head.weight"][0, 0] = 1e300
    p = helpers.save_model(sd, env.root / "huge.safetensors")
    return add(env, p, "huge.safetensors", "head.weight", "too large for float32")


def wrong_shape(env):
    return add(env, with_tensor(env, "head.weight", torch.zeros(4, 16), "shape.safetensors"), "shape.safetensors",
               "head.weight", "has shape [4, 16]")


def missing_tensor(env):
    return add(env, with_tensor(env, "", None, "missing.safetensors", drop="layers.1.norm.weight"),
               "missing.safetensors", "missing tensor 'layers.1.norm.weight'")


def extra_tensor(env):
    return add(env, with_tensor(env, "layers.9.extra.weight", torch.zeros(3), "extra.safetensors"),
               "extra.safetensors", "'layers.9.extra.weight'", "does not have")


def integer_where_float(env):
    return add(env, with_tensor(env, "layers.0.norm.weight", torch.ones(16, dtype=torch.int32), "int.safetensors"),
               "int.safetensors", "non-floating dtype int32")


def float_where_integer(env):
    return add(env, with_tensor(env, "position_ids", torch.zeros(8), "floatpos.safetensors"),
               "floatpos.safetensors", "'position_ids' is floating")


def the_base_itself(env):
    return add(env, env.base, "base.safetensors", "identical to the base model", "--allow-empty")


def already_merged(env):
    return add(env, env.root / "merged_once.safetensors", "already merged as step 1", "--force")


def base_changed(env):
    changed = dict(env.base_sd)
    changed["head.weight"] = changed["head.weight"] + 1
    helpers.save_model(changed, env.base)
    return add(env, helpers.save_model(env.good, env.root / "ok.safetensors"), "base.safetensors",
               "changed since `cmerge init`")


def fisher_file_missing_tensor(env):
    fisher = helpers.fisher_like(env.good, 0)
    del fisher["head.weight"]
    fp = helpers.save_model(fisher, env.root / "fisher.safetensors")
    state = env.root / "fstate"
    init_state(state, env.base, "fisher_merge")
    env.state = state
    return add(env, helpers.save_model(env.good, env.root / "good.safetensors"), "fisher.safetensors",
               "has no tensor 'head.weight'", extra=["--fisher", fp], extras={"fisher": fp})


# --- bad bases (init) and bad config files (merge)

def init_bad(env, base, *fragments, extra=()) -> Bad:
    target = env.root / "new_state"
    return Bad(["init", target, "--base", base, *extra, "-q"], fragments,
               lambda: init_state(target, base, "opcm"), creates=[target])


def base_with_value_beyond_float32(env):
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in env.base_sd.items()}
    sd["head.weight"] = sd["head.weight"].clone()
    sd["head.weight"][1, 1] = -1e300
    return init_bad(env, helpers.save_model(sd, env.root / "hugebase.safetensors"), "head.weight",
                    "too large for float32")


def base_with_nan(env):
    sd = dict(env.base_sd)
    sd["embed_tokens.weight"] = sd["embed_tokens.weight"].clone()
    sd["embed_tokens.weight"][3, 3] = float("nan")
    return init_bad(env, helpers.save_model(sd, env.root / "nanbase.safetensors"), "embed_tokens.weight",
                    "NaN or Inf")


def config_json_not_json(env):
    d = env.root / "badconfig"
    helpers.save_model(env.base_sd, d)
    (d / "config.json").write_text("{this is not json")
    return init_bad(env, d, "config.json", "is not readable JSON")


def merge_config(env, text, *fragments) -> Bad:
    path = env.root / "merge.yml"
    path.write_text(text)
    out = env.root / "merged"
    return Bad(["merge", "--config", path, "-o", out, "-q"], fragments, lambda: load_config(path), creates=[out])


def config_unknown_key(env):
    return merge_config(env, f"base: {env.base}\nmodls: [a]\n", "merge.yml", "unknown key 'modls'")


def config_wrong_type(env):
    return merge_config(env, f"base: {env.base}\nparams: {{alpha: high}}\n", "merge.yml", "alpha must be a float")


def export_overflow(env):
    sd = dict(env.good)
    sd["head.weight"] = sd["head.weight"] + 1e5  # float16 holds at most 65504
    big = env.root / "big"
    st = init_state(big, env.base, "task_arithmetic", lam=1.0)
    st.add(helpers.save_model(sd, env.root / "bigexpert.safetensors"))
    env.state = big
    out = env.root / "half"
    return Bad(["export", big, out, "--dtype", "float16", "-q"], ("head.weight", "float16 cannot hold"),
               lambda: open_state(big).export(out, dtype="float16"), creates=[out, env.root / "half.partial"])


def damaged_manifest(env):
    (env.state / "manifest.json").write_text("{truncated")
    return Bad(["add", env.state, helpers.save_model(env.good, env.root / "g.safetensors"), "-q"],
               ("manifest.json", "not readable JSON"), lambda: open_state(env.state))


def manifest_from_a_newer_cmerge(env):
    m = json.loads((env.state / "manifest.json").read_text())
    m["format_version"] = 99
    (env.state / "manifest.json").write_text(json.dumps(m))
    return Bad(["info", env.state], ("newer cmerge",), lambda: open_state(env.state))


def missing_generation(env):
    m = json.loads((env.state / "manifest.json").read_text())
    shutil.rmtree(env.state / m["generation"])
    return Bad(["export", env.state, env.root / "o", "-q"], ("names generation", "missing"),
               lambda: open_state(env.state), creates=[env.root / "o"])


def parameter_out_of_range(env):
    target = env.root / "s_range"
    return Bad(["init", target, "--base", env.base, "--alpha", "1.5", "-q"], ("alpha must be in [0, 1]",),
               lambda: init_state(target, env.base, "opcm", alpha="1.5"), creates=[target])


CASES = [missing_path, empty_file, header_length_past_end, header_not_json, overlapping_offsets,
         offsets_out_of_range, dtype_length_mismatch, duplicate_names, non_utf8_name, unknown_dtype_code,
         dtype_cmerge_cannot_merge, truncated_data, pickle_with_objects, random_bytes_bin, unknown_suffix,
         folder_without_weights, shard_missing, tensor_in_the_wrong_shard, index_not_json, symlink_loop,
         unreadable_file, nan_value, inf_value, value_beyond_float32, wrong_shape, missing_tensor, extra_tensor,
         integer_where_float, float_where_integer, the_base_itself, already_merged, base_changed,
         fisher_file_missing_tensor, base_with_value_beyond_float32, base_with_nan, config_json_not_json,
         config_unknown_key, config_wrong_type, export_overflow, damaged_manifest, manifest_from_a_newer_cmerge,
         missing_generation, parameter_out_of_range]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    base_sd = helpers.tiny_base(seed=0)
    exps = helpers.experts(base_sd, 2, seed=3)
    base = helpers.save_model(base_sd, root / "models" / "base.safetensors")
    merged_once = helpers.save_model(exps[0], root / "models" / "merged_once.safetensors")
    st = init_state(root / "state", base, "task_arithmetic")
    st.add(merged_once)
    return root, base_sd, exps[1]


def fresh_env(template, tmp_path) -> Env:
    root, base_sd, good = template
    shutil.copytree(root / "models", tmp_path, dirs_exist_ok=True)
    shutil.copytree(root / "state", tmp_path / "state")
    # the copied state must point at the copied base (its path is recorded in the manifest)
    m = json.loads((tmp_path / "state" / "manifest.json").read_text())
    m["base"]["path"] = str(tmp_path / "base.safetensors")
    m["base"]["files"] = {str(tmp_path / "base.safetensors"): [os.stat(tmp_path / "base.safetensors").st_size,
                                                              os.stat(tmp_path / "base.safetensors").st_mtime_ns]}
    (tmp_path / "state" / "manifest.json").write_text(json.dumps(m, indent=2))
    return Env(tmp_path, tmp_path / "base.safetensors", tmp_path / "state", good, base_sd)


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_in_one_sentence_changing_nothing(template, tmp_path, cli, case):
    env = fresh_env(template, tmp_path)
    bad = case(env)
    watched = env.state
    before = helpers.snapshot(watched) if watched.exists() else None
    res = cli(*bad.args)
    helpers.assert_one_sentence_error(res, *bad.fragments)
    assert "Traceback" not in res.stderr + res.stdout
    with pytest.raises(CmergeError) as err:
        bad.api()
    for fragment in bad.fragments:
        if not fragment.startswith("--"):  # flags are the CLI's words; the rest is the same sentence
            assert fragment.lower() in str(err.value).lower(), (fragment, str(err.value))
    assert "\n" not in str(err.value)
    if before is not None:
        assert helpers.snapshot(watched) == before
    for p in bad.creates:
        assert not p.exists(), p

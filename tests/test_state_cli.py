"""The on-disk state and the CLI: streaming = in memory, init + add×N + export = merge, exports, info, flags."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import helpers
from cmerge import REGISTRY, Merger, init_state, open_state
from cmerge.io import content_hash, open_source
from cmerge.errors import CmergeError

METHODS = sorted(m for m, cls in REGISTRY.items() if cls.space == "weights")  # LoRA-factor methods: their own tests


def exported(folder):
    return helpers.load_safetensors_dir(folder)


@pytest.mark.parametrize("method", METHODS)
def test_streaming_state_equals_in_memory(tiny, tmp_path, method):
    paths = tiny["paths"]
    st = init_state(tmp_path / "state", paths["base"], method)
    mem = Merger(tiny["base"], method)
    fisher = method == "fisher_merge"
    for i in range(4):
        e_disk = st.add(paths[f"m{i}"], extras={"fisher": paths[f"f{i}"]} if fisher else None)
        e_mem = mem.add(tiny["experts"][i], extras={"fisher": tiny["fishers"][i]} if fisher else None)
        assert e_disk["sha256"] == e_mem["sha256"]
        assert e_disk["norm"] == e_mem["norm"] and e_disk["lambda"] == e_mem["lambda"]
    st.export(tmp_path / "out")
    got, want = exported(tmp_path / "out"), mem.state_dict()
    assert set(got) == set(want) == set(tiny["base"])
    for n in want:
        assert got[n].dtype == tiny["base"][n].dtype
        assert torch.equal(got[n], want[n].to(got[n].dtype)), n
    # a state re-opened from disk continues exactly like the one in memory
    st2 = open_state(tmp_path / "state")
    assert len(st2.steps) == 4 and st2.manifest.scalars == mem.scalars


def test_cli_init_add_export_equals_merge(tiny, tmp_path, cli):
    p = tiny["paths"]
    assert cli("init", tmp_path / "s", "--base", p["base"], "--alpha", "0.4", "-q").exit_code == 0
    for i in range(3):
        res = cli("add", tmp_path / "s", p[f"m{i}"], "-q")
        assert res.exit_code == 0, res.stderr
        assert res.stdout.startswith(f"step {i + 1}: merged m{i}")
    assert cli("export", tmp_path / "s", tmp_path / "a", "-q").exit_code == 0
    res = cli("merge", "--base", p["base"], p["m0"], p["m1"], p["m2"], "--alpha", "0.4", "-o", tmp_path / "b", "-q")
    assert res.exit_code == 0, res.stderr
    a, b = exported(tmp_path / "a"), exported(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    # and both equal the slow float64 reference (the CLI computes in float32)
    want = helpers.ref_opcm(tiny["base"], tiny["experts"][:3], helpers.TINY_PROJECTED, alpha=0.4)[-1]["merged"]
    assert helpers.max_rel_err(a, want) < 1e-4
    assert torch.equal(a["position_ids"], tiny["base"]["position_ids"])


def test_merge_shuffle_is_seeded(tiny, tmp_path, cli):
    p = tiny["paths"]
    models = [p[f"m{i}"] for i in range(4)]
    for out in ("x", "y"):
        assert cli("merge", "--base", p["base"], *models, "--shuffle", "--seed", "3", "-o", tmp_path / out,
                   "-q").exit_code == 0
    x, y = exported(tmp_path / "x"), exported(tmp_path / "y")
    assert all(torch.equal(x[n], y[n]) for n in x)
    order = [s["name"] for s in json.loads((tmp_path / "x" / "cmerge_merge.json").read_text())["steps"]]
    assert sorted(order) == ["m0", "m1", "m2", "m3"]
    assert cli("merge", "--base", p["base"], *[p[n] for n in order], "-o", tmp_path / "z", "-q").exit_code == 0
    plain = exported(tmp_path / "z")
    assert all(torch.equal(x[n], plain[n]) for n in x)


def test_sharded_round_trip(tiny, tmp_path, cli):
    p = tiny["paths"]
    assert cli("merge", "--base", p["base"], p["m0"], p["m1"], "-o", tmp_path / "one", "-q").exit_code == 0
    assert cli("merge", "--base", p["base"], p["m0"], p["m1"], "-o", tmp_path / "many", "--shard-size", "2KB",
               "-q").exit_code == 0
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "many" / "model.safetensors").exists()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    one, many = exported(tmp_path / "one"), exported(tmp_path / "many")
    assert set(one) == set(many) and all(torch.equal(one[n], many[n]) for n in one)
    # cmerge reads both back as the same model: a sharded export is a valid input, and the
    # single-file export is then refused as the model already merged
    assert content_hash(open_source(tmp_path / "one")) == content_hash(open_source(tmp_path / "many"))
    st = init_state(tmp_path / "s", p["base"])
    st.add(tmp_path / "many")
    with pytest.raises(CmergeError, match="already merged"):
        st.add(tmp_path / "one")


def test_sharded_inputs_equal_single_file_inputs(tiny, tmp_path):
    from cmerge.io import write_sharded

    p = tiny["paths"]
    sharded = []
    for i in range(2):
        d = tmp_path / f"sharded{i}"
        d.mkdir()
        e = tiny["experts"][i]
        write_sharded(d, [(n, e[n].dtype, tuple(e[n].shape)) for n in sorted(e)], ((n, e[n]) for n in sorted(e)), 1500)
        assert (d / "model.safetensors.index.json").exists()
        sharded.append(d)
    a = init_state(tmp_path / "a", p["base"])
    b = init_state(tmp_path / "b", p["base"])
    for i in range(2):
        assert a.add(p[f"m{i}"])["sha256"] == b.add(sharded[i])["sha256"]
    a.export(tmp_path / "ea")
    b.export(tmp_path / "eb")
    ea, eb = exported(tmp_path / "ea"), exported(tmp_path / "eb")
    assert all(torch.equal(ea[n], eb[n]) for n in ea)


def test_info_json(tiny, tmp_path, cli):
    p = tiny["paths"]
    cli("init", tmp_path / "s", "--base", p["base"], "--method", "ties", "--density", "0.3", "-q")
    for i in range(2):
        cli("add", tmp_path / "s", p[f"m{i}"], "--name", f"task{i}", "-q")
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    assert info["method"] == "ties"
    assert info["params"] == {"density": 0.3, "lam": 0.3, "variant": "paper"}
    assert info["base"]["path"] == str(p["base"].resolve())
    assert re.fullmatch(r"[0-9a-f]{64}", info["base"]["sha256"])
    assert [s["name"] for s in info["steps"]] == ["task0", "task1"]
    for s, e in zip(info["steps"], tiny["experts"]):
        assert {"name", "sha256", "norm", "lambda", "t"} <= set(s)
        assert re.fullmatch(r"[0-9a-f]{64}", s["sha256"])
        assert s["norm"] == pytest.approx(helpers.global_norm(helpers.sub(helpers.f64(e), helpers.f64(tiny["base"]))),
                                          rel=1e-6)
    assert info["steps"][0]["sha256"] != info["steps"][1]["sha256"]
    text = cli("info", tmp_path / "s")
    assert text.exit_code == 0 and "task1" in text.stdout and info["steps"][1]["sha256"] in text.stdout


def test_info_json_opcm_lambda(tiny, tmp_path, cli):
    p = tiny["paths"]
    cli("init", tmp_path / "s", "--base", p["base"], "-q")
    for i in range(3):
        cli("add", tmp_path / "s", p[f"m{i}"], "-q")
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    ref = helpers.ref_opcm(tiny["base"], tiny["experts"][:3], helpers.TINY_PROJECTED)
    assert [s["lambda"] for s in info["steps"]] == pytest.approx([r["lambda"] for r in ref], rel=1e-5)
    assert info["params"]["alpha"] == 0.5 and info["params"]["keep_diagonal"] is False


def test_export_folder_contents(tiny, tmp_path, cli):
    p = tiny["paths"]
    base_dir = helpers.save_model(tiny["base"], tmp_path / "basedir")
    (base_dir / "config.json").write_text(json.dumps({"model_type": "none-such", "hidden_size": 16}))
    (base_dir / "tokenizer.json").write_text("{}")
    (base_dir / "README.md").write_text("the base's own card")
    cli("init", tmp_path / "s", "--base", base_dir, "--method", "magmax", "--scale", "0.7", "-q")
    entries = []
    for i in range(3):
        assert cli("add", tmp_path / "s", p[f"m{i}"], "-q").exit_code == 0
    entries = json.loads(cli("info", tmp_path / "s", "--json").stdout)["steps"]
    assert cli("export", tmp_path / "s", tmp_path / "out", "-q").exit_code == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "the base's own card" not in card
    assert "magmax" in card and "`scale`" in card and "0.7" in card
    for e in entries:
        assert e["sha256"] in card and e["name"] in card
    prov = json.loads((out / "cmerge_merge.json").read_text())
    assert prov["method"] == "magmax" and len(prov["steps"]) == 3
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert h.metadata().get("format") == "pt"
    # export never overwrites
    res = cli("export", tmp_path / "s", out, "-q")
    helpers.assert_one_sentence_error(res, "already exists")


def test_export_before_any_step_is_refused(tiny, tmp_path, cli):
    cli("init", tmp_path / "s", "--base", tiny["paths"]["base"], "-q")
    helpers.assert_one_sentence_error(cli("export", tmp_path / "s", tmp_path / "o", "-q"), "nothing has been merged")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(tmp_path, cli, dtype):
    base = helpers.tiny_base(seed=4, dtype=dtype)
    exps = helpers.experts(base, 3, seed=6)
    assert all(e["head.weight"].dtype == dtype for e in exps)
    paths = [helpers.save_model(m, tmp_path / f"{i}.safetensors") for i, m in enumerate([base] + exps)]
    res = cli("merge", "--base", paths[0], *paths[1:], "-o", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.stderr
    got = exported(tmp_path / "out")
    want = helpers.ref_opcm(base, exps, helpers.TINY_PROJECTED)[-1]["merged"]
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for n, w in want.items():
        assert got[n].dtype == dtype
        assert float((got[n].double() - w).norm()) <= tol * float(w.norm()), n
    assert got["position_ids"].dtype == torch.int64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_export_dtype(tiny, tmp_path, cli, dtype):
    p = tiny["paths"]
    cli("init", tmp_path / "s", "--base", p["base"], "-q")
    cli("add", tmp_path / "s", p["m0"], "-q")
    cli("add", tmp_path / "s", p["m1"], "-q")
    assert cli("export", tmp_path / "s", tmp_path / "full", "-q").exit_code == 0
    assert cli("export", tmp_path / "s", tmp_path / "cast", "--dtype", dtype, "-q").exit_code == 0
    full, cast = exported(tmp_path / "full"), exported(tmp_path / "cast")
    want = getattr(torch, dtype)
    for n in full:
        if full[n].dtype.is_floating_point:
            assert cast[n].dtype == want, n
            assert torch.equal(cast[n], full[n].to(want)), n
        else:
            assert cast[n].dtype == full[n].dtype and torch.equal(cast[n], full[n])
    assert f"exported dtype: {dtype}" in (tmp_path / "cast" / "README.md").read_text()


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["methods", "--help"], ["--version"], ["info"],
                                  ["info", "--json"]])
def test_the_command_starts_without_torch_or_transformers(args, tiny, tmp_path, cli):
    import subprocess
    import sys

    on_state = args[0] == "info" and "--help" not in args
    if on_state:  # a merge state with two steps
        state = tmp_path / "state"
        assert cli("init", state, "--base", tiny["paths"]["base"], "-q").exit_code == 0
        for m in ("m0", "m1"):
            assert cli("add", state, tiny["paths"][m], "-q").exit_code == 0
        args = [args[0], str(state), *args[1:]]
    probe = ("import sys\nfrom cmerge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    if on_state:  # and it shows what the in-process command shows
        assert done.stdout.strip().splitlines()[:-1] == cli(*args).stdout.strip().splitlines()


def test_the_lazily_listed_commands_show_their_own_help_line(cli):
    from click.utils import make_default_short_help

    from cmerge.cli import LAZY_COMMANDS, main

    listing = cli("--help").stdout
    for name, (_, line) in LAZY_COMMANDS.items():
        command = main.get_command(None, name)
        assert command is not None and command.get_short_help_str(10_000) == line, name
        assert f"{name}  " in listing and make_default_short_help(line, 40)[:30] in listing, name


def test_every_method_flag_in_init_help_and_foreign_flags_refused(tiny, tmp_path, cli):
    help_text = cli("init", "--help").stdout
    merge_help = cli("merge", "--help").stdout
    listing = cli("methods").stdout
    for name, cls in REGISTRY.items():
        assert name in help_text and f"{name}:" in listing
        for prm in cls.params:
            assert prm.flag in help_text, prm.flag
            assert prm.flag in merge_help, prm.flag
    base = tiny["paths"]["base"]
    for name, cls in REGISTRY.items():
        own = {prm.name for prm in cls.params}
        for other_name, other in REGISTRY.items():
            foreign = [prm for prm in other.params if prm.name not in own]
            if not foreign:
                continue
            prm = foreign[0]
            value = [] if prm.type is bool else [str(prm.default)]
            state = tmp_path / f"{name}-{prm.name}"
            res = cli("init", state, "--base", base, "--method", name, prm.flag, *value, "-q")
            helpers.assert_one_sentence_error(res, prm.flag, name)
            assert not state.exists()
    res = cli("merge", "--base", base, tiny["paths"]["m0"], "--method", "average", "--alpha", "0.3",
              "-o", tmp_path / "o", "-q")
    helpers.assert_one_sentence_error(res, "--alpha", "average")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--alpha", "1.5"], "alpha"),
    (["--alpha", "-0.1"], "alpha"),
    (["--method", "ties", "--density", "0"], "density"),
])
def test_out_of_range_parameters(tiny, tmp_path, cli, args, fragment):
    res = cli("init", tmp_path / "s", "--base", tiny["paths"]["base"], *args, "-q")
    helpers.assert_one_sentence_error(res, fragment)
    assert not (tmp_path / "s").exists()


def test_own_method_flags_are_recorded(tiny, tmp_path, cli):
    res = cli("init", tmp_path / "s", "--base", tiny["paths"]["base"], "--keep-diagonal", "--scaling", "sqrt_t",
              "--drop-cross-blocks", "--norm-average", "projected", "--alpha", "0.25", "--kernel", "float32", "-q")
    assert res.exit_code == 0, res.stderr
    assert open_state(tmp_path / "s").manifest.params == {
        "alpha": 0.25, "keep_diagonal": True, "drop_cross_blocks": True, "scaling": "sqrt_t",
        "norm_average": "projected", "kernel": "float32"}


def test_tiny_bert_through_the_cli(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    base_dir = tmp_path / "bert-base"
    base_model = helpers.tiny_bert(base_dir)
    base_sd = {n: t.detach().clone() for n, t in base_model.state_dict().items()}
    exps = [helpers.perturbed_copy(base_dir, tmp_path / f"bert-{i}", seed=i, scale=0.02) for i in range(3)]
    res = cli("merge", "--base", base_dir, *[tmp_path / f"bert-{i}" for i in range(3)], "-o", tmp_path / "merged",
              "--state", tmp_path / "state", "-q")
    assert res.exit_code == 0, res.stderr
    merged_model = transformers.BertModel.from_pretrained(str(tmp_path / "merged")).eval()
    ids = torch.tensor([[1, 5, 7, 2, 0]])
    with torch.no_grad():
        out = merged_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (1, 5, 16) and bool(torch.isfinite(out).all())

    info = json.loads(cli("info", tmp_path / "state", "--json").stdout)
    assert info["base"]["classified_by"].startswith("architecture")
    cls = info["classification"]
    lam = info["steps"][-1]["lambda"]
    got = exported(tmp_path / "merged")
    for emb in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        assert cls[emb] == "other"
        # identity rule (Eq. 8): θ0 + Σ τ_i / λ_T — no projection
        want = base_sd[emb].double() + sum(e[emb].double() - base_sd[emb].double() for e in exps) / lam
        assert float((got[emb].double() - want).norm()) < 1e-5 * float(want.norm())
    q = "encoder.layer.0.attention.self.query.weight"
    assert cls[q] == "linear"
    unprojected = base_sd[q].double() + sum(e[q].double() - base_sd[q].double() for e in exps) / lam
    assert float((got[q].double() - unprojected).norm()) > 1e-3 * float((unprojected - base_sd[q].double()).norm())
    ref = helpers.ref_opcm(base_sd, exps, {n for n, k in cls.items() if k == "linear"})[-1]["merged"]
    assert helpers.max_rel_err(got, ref) < 1e-4

    # the same merge exported as shards loads too
    assert cli("export", tmp_path / "state", tmp_path / "sharded", "--shard-size", "8KB", "-q").exit_code == 0
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = transformers.BertModel.from_pretrained(str(tmp_path / "sharded")).eval()
    with torch.no_grad():
        out2 = again(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(out, out2)


def test_fisher_merge_finds_second_moments_beside_model_folders(tiny, tmp_path, cli):
    folders = []
    for i in range(3):
        d = helpers.save_model(tiny["experts"][i], tmp_path / f"expert{i}")
        helpers.save_model(tiny["fishers"][i], d / "exp_avg_sq.safetensors")
        folders.append(d)
    res = cli("merge", "--base", tiny["paths"]["base"], *folders, "--method", "fisher_merge", "-o", tmp_path / "out",
              "--state", tmp_path / "state", "-q")
    assert res.exit_code == 0, res.stderr
    want = helpers.ref_fisher(tiny["base"], tiny["experts"][:3], tiny["fishers"][:3])[-1]
    assert helpers.max_rel_err(exported(tmp_path / "out"), want) < 1e-5
    steps = json.loads(cli("info", tmp_path / "state", "--json").stdout)["steps"]
    assert all("exp_avg_sq.safetensors" in s["extras"]["fisher"] for s in steps)

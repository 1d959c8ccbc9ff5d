"""Linear weights found the way transformers loads a checkpoint, on every layout the hub holds.

The ground truth is computed here without cmerge: each checkpoint is loaded with
``from_pretrained`` and every ``nn.Linear`` / ``Conv1D`` weight of the loaded model (and
every expert matrix of a stacked-experts parameter) is traced back to the file tensor
holding the same values. Linear weights tied to an embedding are embeddings.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from cmerge.io import open_source
from cmerge.errors import CmergeError
from cmerge.layers import BY_ARCHITECTURE, BY_NAME, LINEAR, LINEAR_STACK, LINEAR_T, OTHER, classify

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)


def _save(model, folder):
    model.save_pretrained(str(folder))
    return folder


def _clip_vision(folder):
    cfg = transformers.CLIPVisionConfig(num_hidden_layers=2, image_size=8, patch_size=4, **SMALL)
    return _save(transformers.CLIPVisionModel(cfg), folder)


def _hub_layout_clip(folder):
    """A CLIPVisionModel as the hub holds the paper's experts: keys `vision_model.*`, a 4.x config.json."""
    _clip_vision(folder)
    sd = load_file(str(folder / "model.safetensors"))
    save_file({f"vision_model.{k}": v for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["transformers_version"] = "4.40.0"
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _clip(folder):
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=40, num_hidden_layers=1, max_position_embeddings=16,
                                                   **SMALL),
                                  vision_config=dict(num_hidden_layers=1, image_size=8, patch_size=4, **SMALL),
                                  projection_dim=8)
    return _save(transformers.CLIPModel(cfg), folder)


def _vit(folder, head=False):
    cfg = transformers.ViTConfig(num_hidden_layers=2, image_size=8, patch_size=4, num_labels=3, **SMALL)
    cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    return _save(cls(cfg), folder)


def _bert(folder):
    helpers.tiny_bert(folder)
    return folder


def _gpt2(folder):
    helpers.tiny_gpt2(folder)
    return folder


def _llama(folder, tied):
    cfg = transformers.LlamaConfig(num_hidden_layers=1, num_key_value_heads=1, vocab_size=40,
                                   tie_word_embeddings=tied, **SMALL)
    return _save(transformers.LlamaForCausalLM(cfg), folder)


def _t5(folder):
    cfg = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=40)
    return _save(transformers.T5ForConditionalGeneration(cfg), folder)


def _mixtral(folder):
    cfg = transformers.MixtralConfig(num_hidden_layers=1, num_key_value_heads=1, vocab_size=40, num_local_experts=2,
                                     num_experts_per_tok=1, **SMALL)
    return _save(transformers.MixtralForCausalLM(cfg), folder)


def _mixtral_fused(folder):
    """A MoE checkpoint that stores each layer's experts stacked in one 3-D tensor, as the model holds them."""
    from safetensors.torch import save_file as save

    cfg = transformers.MixtralConfig(num_hidden_layers=1, num_key_value_heads=1, vocab_size=40, num_local_experts=2,
                                     num_experts_per_tok=1, **SMALL)
    model = transformers.MixtralForCausalLM(cfg)
    model.save_pretrained(str(folder))  # config.json; the weights are then written stacked
    save({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
         metadata={"format": "pt"})
    return folder


BUILDERS = {
    "clip_vision_hub_layout": _hub_layout_clip,
    "clip_vision_v5_save": _clip_vision,
    "clip": _clip,
    "vit": _vit,
    "vit_classifier": lambda f: _vit(f, head=True),
    "bert": _bert,
    "gpt2_conv1d": _gpt2,
    "llama_tied": lambda f: _llama(f, True),
    "llama_untied": lambda f: _llama(f, False),
    "t5": _t5,
    "mixtral_moe": _mixtral,
    "mixtral_moe_fused": _mixtral_fused,
}


def ground_truth(folder) -> dict[str, str]:
    """File key → LINEAR / LINEAR_T / OTHER by loading the model and matching tensor values."""
    cfg = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(folder))
    owners: dict[int, list[torch.nn.Module]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod)
    linear, stacks = [], []
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            w = mod.weight
            if all(isinstance(o, (torch.nn.Linear, Conv1D)) for o in owners[id(w)]):  # tied to an embedding: not linear
                linear.append((w.detach(), LINEAR_T if isinstance(mod, Conv1D) else LINEAR))
        if type(mod).__name__.endswith("Experts"):  # transformers 5's MoE experts hold their matrices stacked
            stacks.extend(p.detach() for p in mod.parameters(recurse=False) if p.ndim == 3)
    truth = {}
    for key, t in load_file(str(folder / "model.safetensors")).items():
        kind = OTHER
        if t.ndim == 3 and any(s.shape == t.shape and torch.equal(s, t) for s in stacks):
            kind = LINEAR_STACK  # the experts' matrices, stacked as the model holds them
        if t.ndim == 2 and t.dtype.is_floating_point:
            for w, k in linear:
                if w.shape == t.shape and torch.equal(w, t):
                    kind = k
            for stack in stacks:  # one expert's matrix inside a stacked-experts parameter
                for e in range(stack.shape[0]):
                    m = stack[e]
                    for mat in (m, m.mT):
                        if mat.shape[1] == t.shape[1] and any(
                                torch.equal(mat[r:r + t.shape[0]], t) for r in range(0, mat.shape[0] - t.shape[0] + 1)):
                            kind = LINEAR
        truth[key] = kind
    return truth


def metas_of(folder):
    src = open_source(folder)
    return {n: src.meta(n) for n in src.keys()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_projected_set_equals_ground_truth(built, name, caplog):
    folder = built[name]
    truth = ground_truth(folder)
    assert any(k in (LINEAR, LINEAR_T) for k in truth.values())
    with caplog.at_level("WARNING", logger="cmerge"):
        c = classify(metas_of(folder), folder)
    assert c.kinds == truth
    assert c.how == "architecture (config.json)"
    assert set(c.routes.values()) <= {BY_ARCHITECTURE, "dtype"}
    assert not c.notes and not caplog.records  # nothing fell back, so nothing is said


def test_hub_layout_clip_has_its_12_linear_weights(built):
    c = classify(metas_of(built["clip_vision_hub_layout"]), built["clip_vision_hub_layout"])
    assert len(c.projected()) == 12
    assert all(n.startswith("vision_model.encoder.layers.") for n in c.projected())
    assert c.kinds["vision_model.embeddings.patch_embedding.weight"] == OTHER
    assert c.kinds["vision_model.embeddings.position_embedding.weight"] == OTHER
    assert c.summary().startswith("12 projected (12 architecture)")


def test_moe_experts_are_linear(built):
    c = classify(metas_of(built["mixtral_moe"]), built["mixtral_moe"])
    experts = [n for n in c.kinds if ".experts." in n]
    assert len(experts) == 6 and all(c.kinds[n] == LINEAR for n in experts)


def test_stacked_experts_are_projected_matrix_by_matrix(built):
    from cmerge import Merger

    folder = built["mixtral_moe_fused"]
    c = classify(metas_of(folder), folder)
    stacks = [n for n, k in c.kinds.items() if k == LINEAR_STACK]
    assert sorted(stacks) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    src = open_source(folder)
    base = {n: src.get(n) for n in src.keys()}
    exps = helpers.experts(base, 2, seed=4)
    m = Merger(folder, "opcm", precision="float64")
    m.add(exps[0])
    d1 = {n: m.state_dict()[n] - base[n].double() for n in stacks}
    lam1 = m.steps[-1]["lambda"]
    m.add(exps[1])
    lam2 = m.steps[-1]["lambda"]
    for n in stacks:  # each expert's projected update is orthogonal to that expert's merged task vector
        proj = lam2 * (m.state_dict()[n] - base[n].double()) - lam1 * d1[n]
        for e in range(proj.shape[0]):
            inner = float((proj[e] * d1[n][e]).sum())
            assert abs(inner) < 1e-10 * float(proj[e].norm() * d1[n][e].norm()), (n, e)
        tau = exps[1][n].double() - base[n].double()
        assert float((proj - tau).norm()) > 1e-3 * float(tau.norm())  # and it was projected


def test_tied_lm_head_is_an_embedding(built):
    untied = classify(metas_of(built["llama_untied"]), built["llama_untied"])
    assert untied.kinds["lm_head.weight"] == LINEAR
    tied = classify(metas_of(built["llama_tied"]), built["llama_tied"])
    assert "lm_head.weight" not in tied.kinds  # not saved
    assert tied.kinds["model.embed_tokens.weight"] == OTHER


@pytest.mark.parametrize("name", ["clip_vision_hub_layout", "vit", "bert", "llama_tied"])
def test_without_transformers_the_name_rule_is_used_and_said(built, name, monkeypatch, caplog):
    folder = built[name]
    truth = ground_truth(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with caplog.at_level("WARNING", logger="cmerge"):
        c = classify(metas_of(folder), folder)
    assert c.how == BY_NAME
    assert c.notes == ("linear weights were found by the name rule, because transformers is not installed.",)
    assert [r.getMessage() for r in caplog.records] == list(c.notes)
    assert set(c.routes.values()) <= {BY_NAME, "dtype"}
    assert c.kinds == truth  # on these layouts the name rule happens to agree


def _renamed(src_folder, dst_folder, prefix):
    """A copy of a checkpoint whose keys the architecture cannot place (an unknown prefix)."""
    dst_folder.mkdir()
    (dst_folder / "config.json").write_text((src_folder / "config.json").read_text())
    sd = load_file(str(src_folder / "model.safetensors"))
    save_file({prefix + k.split(".", 1)[1]: v for k, v in sd.items()}, str(dst_folder / "model.safetensors"),
              metadata={"format": "pt"})
    return dst_folder


def test_unplaced_weights_fall_back_to_names_and_say_so(built, tmp_path, caplog):
    folder = _renamed(built["clip_vision_hub_layout"], tmp_path / "odd", "visual_model.")
    with caplog.at_level("WARNING", logger="cmerge"):
        c = classify(metas_of(folder), folder)
    assert c.notes == ("matched 0 of 12 linear weights of CLIPVisionModel by module; 12 classified by name instead.",)
    assert [r.getMessage() for r in caplog.records] == list(c.notes)
    assert len(c.projected()) == 12 and all(c.routes[n] == BY_NAME for n in c.projected())
    assert c.how == "architecture (config.json) + name rule"
    with pytest.raises(CmergeError, match="strict-layers"):
        classify(metas_of(folder), folder, strict=True)


def test_unbuildable_architecture_says_why(tmp_path, caplog):
    helpers.save_model(helpers.tiny_base(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["Nope"]}))
    with caplog.at_level("WARNING", logger="cmerge"):
        c = classify(metas_of(tmp_path), tmp_path)
    assert len(c.notes) == 1 and c.notes[0].startswith("linear weights were found by the name rule, because "
                                                       "transformers could not build the architecture of")
    assert str(tmp_path / "config.json") in c.notes[0]
    (tmp_path / "config.json").write_text("{not json")  # a broken folder: refused, not guessed at
    with pytest.raises(CmergeError, match="config.json is not readable JSON"):
        classify(metas_of(tmp_path), tmp_path)


# ---------------------------------------------------------------- end to end, through the CLI

@pytest.fixture(scope="module")
def clip_experts(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_experts")
    base = built["clip_vision_hub_layout"]
    paths = []
    for i in range(4):
        helpers.perturbed_copy(base, root / f"e{i}", seed=i, scale=0.01)
        paths.append(root / f"e{i}")
    return base, paths


def test_default_flags_equal_naming_the_12_weights(clip_experts, tmp_path, cli):
    base, experts = clip_experts
    res = cli("merge", "--base", base, *experts, "--method", "opcm", "-o", tmp_path / "default", "-q")
    assert res.exit_code == 0, res.stderr
    assert "tensors: 12 projected (12 architecture)" in res.stdout
    assert "warning" not in res.stderr
    patterns = [r"self_attn\.(q|k|v|out)_proj\.weight$", r"mlp\.fc[12]\.weight$"]
    res = cli("merge", "--base", base, *experts, "--method", "opcm", "-o", tmp_path / "named", "-q",
              "--project", patterns[0], "--project", patterns[1])
    assert res.exit_code == 0, res.stderr
    got, want = helpers.load_safetensors_dir(tmp_path / "default"), helpers.load_safetensors_dir(tmp_path / "named")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    provenance = json.loads((tmp_path / "default" / "cmerge_merge.json").read_text())
    assert len(provenance["projected"]) == 12
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in (tmp_path / "default" / "README.md").read_text()


def test_failed_matching_is_said_and_strict_refuses(built, tmp_path, cli):
    folder = _renamed(built["clip_vision_hub_layout"], tmp_path / "odd", "visual_model.")
    res = cli("init", tmp_path / "s", "--base", folder, "-q")
    assert res.exit_code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["warning: matched 0 of 12 linear weights of CLIPVisionModel by module; 12 classified by name "
                     "instead."]
    assert "12 projected (12 name rule)" in res.stdout
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    assert info["base"]["classified_by"] == "architecture (config.json) + name rule"
    assert set(info["routes"][n] for n in info["projected"]) == {BY_NAME}
    res = cli("init", tmp_path / "strict", "--base", folder, "--strict-layers", "-q")
    helpers.assert_one_sentence_error(res, "matched 0 of 12", "--strict-layers")
    assert not (tmp_path / "strict").exists()
    expert = tmp_path / "odd_expert"
    helpers.perturbed_copy(folder, expert, seed=3)
    res = cli("merge", "--base", folder, expert, "-o", tmp_path / "out", "--strict-layers", "-q")
    helpers.assert_one_sentence_error(res, "--strict-layers")
    assert not (tmp_path / "out").exists()


def test_info_and_dry_run_show_a_models_classification(built, tmp_path, cli):
    folder = built["clip_vision_hub_layout"]
    res = cli("info", folder, "--tensors")
    assert res.exit_code == 0, res.stderr
    assert "12 projected (12 architecture)" in res.stdout
    assert "linear      architecture vision_model.encoder.layers.1.mlp.fc2.weight" in res.stdout
    data = json.loads(cli("info", folder, "--json").stdout)
    assert len(data["projected"]) == 12
    res = cli("merge", "--base", folder, folder, "-o", tmp_path / "never", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert "12 projected (12 architecture)" in res.stdout
    assert not (tmp_path / "never").exists()

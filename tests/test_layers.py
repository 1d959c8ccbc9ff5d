"""layers.classify: by architecture (config.json on the meta device), by name rule, and user overrides."""
from __future__ import annotations

import json

import pytest
import torch

import helpers
from cmerge.io import TensorMeta, open_source
from cmerge.errors import CmergeError
from cmerge.layers import LINEAR, LINEAR_T, OTHER, PASSTHROUGH, classify

pytest.importorskip("transformers")


def metas_of(folder):
    src = open_source(folder)
    return {n: src.meta(n) for n in src.keys()}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    model = helpers.tiny_bert(d)
    return d, model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    model = helpers.tiny_gpt2(d)
    return d, model


def test_bert_by_architecture(bert_dir):
    folder, model = bert_dir
    c = classify(metas_of(folder), folder)
    kinds, how = c.kinds, c.how
    assert how.startswith("architecture")
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear_weights  # query, key, value, dense layers, pooler
    for name, kind in kinds.items():
        if name in linear_weights:
            assert kind == LINEAR, name
        else:
            assert kind == OTHER, name
    for emb in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight"):
        assert kinds[emb] == OTHER
    assert kinds["encoder.layer.0.attention.self.query.weight"] == LINEAR
    assert kinds["encoder.layer.0.attention.self.query.bias"] == OTHER
    assert kinds["embeddings.LayerNorm.weight"] == OTHER


def test_gpt2_conv1d_is_linear_t(gpt2_dir):
    folder, model = gpt2_dir
    c = classify(metas_of(folder), folder)
    kinds, how = c.kinds, c.how
    assert how.startswith("architecture")
    assert kinds["transformer.h.0.attn.c_attn.weight"] == LINEAR_T
    assert kinds["transformer.h.0.mlp.c_fc.weight"] == LINEAR_T
    assert kinds["transformer.h.0.mlp.c_proj.weight"] == LINEAR_T
    assert kinds["transformer.h.0.attn.c_attn.bias"] == OTHER
    assert kinds["transformer.wte.weight"] == OTHER
    assert kinds["transformer.wpe.weight"] == OTHER
    assert LINEAR not in kinds.values()  # the tied lm_head is not saved; everything else is Conv1D


def test_gpt2_conv1d_projected_by_opcm(gpt2_dir):
    """A Conv1D weight (in × out layout) is projected: the new step's update is orthogonal to D."""
    from cmerge import Merger

    folder, _ = gpt2_dir
    src = open_source(folder)
    base = {n: src.get(n) for n in src.keys()}
    exps = helpers.experts(base, 2, seed=9)
    m = Merger(folder, "opcm", precision="float64")
    assert m.kinds["transformer.h.0.attn.c_attn.weight"] == LINEAR_T
    m.add(exps[0])
    d1 = m.state_dict()["transformer.h.0.attn.c_attn.weight"] - base["transformer.h.0.attn.c_attn.weight"].double()
    l1 = m.steps[-1]["lambda"]
    m.add(exps[1])
    d2 = m.state_dict()["transformer.h.0.attn.c_attn.weight"] - base["transformer.h.0.attn.c_attn.weight"].double()
    proj = m.steps[-1]["lambda"] * d2 - l1 * d1
    assert abs(float((proj * d1).sum())) < 1e-10 * float(proj.norm() * d1.norm())
    tau = exps[1]["transformer.h.0.attn.c_attn.weight"].double() - base["transformer.h.0.attn.c_attn.weight"].double()
    assert float((proj - tau).norm()) > 1e-3 * float(tau.norm())


def test_name_rule_without_config(bert_dir, tmp_path):
    folder, model = bert_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    c = classify(metas_of(bare), bare)
    kinds, how = c.kinds, c.how
    assert how == "name rule"
    arch = classify(metas_of(folder), folder).kinds
    assert kinds == arch  # on BERT the name rule agrees with the architecture


def test_name_rule_on_tiny_layout():
    base = helpers.tiny_base()
    metas = {n: TensorMeta(tuple(t.shape), t.dtype) for n, t in base.items()}
    c = classify(metas, None)
    kinds, how = c.kinds, c.how
    assert how == "name rule"
    assert {n for n, k in kinds.items() if k == LINEAR} == set(helpers.TINY_PROJECTED)
    assert kinds["embed_tokens.weight"] == OTHER
    assert kinds["conv.weight"] == OTHER
    assert kinds["position_ids"] == PASSTHROUGH


def test_config_of_unknown_architecture_falls_back_to_names(tmp_path):
    helpers.save_model(helpers.tiny_base(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["Nope"]}))
    c = classify(metas_of(tmp_path), tmp_path)
    kinds, how = c.kinds, c.how
    assert how == "name rule"
    assert {n for n, k in kinds.items() if k == LINEAR} == set(helpers.TINY_PROJECTED)


def test_user_overrides(bert_dir):
    folder, _ = bert_dir
    metas = metas_of(folder)
    c = classify(metas, folder, project=[r"word_embeddings"], no_project=[r"attention\.self"])
    kinds, how = c.kinds, c.how
    assert how.endswith("+ user patterns")
    assert kinds["embeddings.word_embeddings.weight"] == LINEAR
    assert kinds["encoder.layer.0.attention.self.query.weight"] == OTHER
    assert kinds["encoder.layer.0.attention.output.dense.weight"] == LINEAR
    # no_project wins over project
    kinds = classify(metas, folder, project=[r"query\.weight"], no_project=["query"]).kinds
    assert kinds["encoder.layer.0.attention.self.query.weight"] == OTHER


def test_bad_override_patterns(bert_dir):
    folder, _ = bert_dir
    metas = metas_of(folder)
    with pytest.raises(CmergeError, match="only 2-D weights"):
        classify(metas, folder, project=[r"LayerNorm\.weight"])
    with pytest.raises(CmergeError, match="not a valid regular expression"):
        classify(metas, folder, no_project=["(unclosed"])


def test_cli_overrides_reach_the_state(bert_dir, tmp_path, cli):
    folder, _ = bert_dir
    res = cli("init", tmp_path / "s", "--base", folder, "--project", "word_embeddings", "--no-project", "query", "-q")
    assert res.exit_code == 0, res.stderr
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    cls = info["classification"]
    assert cls["embeddings.word_embeddings.weight"] == LINEAR
    assert cls["encoder.layer.0.attention.self.query.weight"] == OTHER
    assert cls["encoder.layer.0.attention.self.key.weight"] == LINEAR
    assert "user patterns" in info["base"]["classified_by"]
    listing = cli("info", tmp_path / "s", "--tensors").stdout
    assert "embeddings.word_embeddings.weight" in listing
    res = cli("init", tmp_path / "s2", "--base", folder, "--project", "LayerNorm.bias", "-q")
    helpers.assert_one_sentence_error(res, "only 2-D")
    assert not (tmp_path / "s2").exists()

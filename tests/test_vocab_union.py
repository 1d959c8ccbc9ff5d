"""--vocab union: experts whose vocabulary grew keep their new rows; the shared rows merge as usual.

Ground truth: the same merge of the experts cut back to the base's vocabulary (a state without
--vocab union), and the new rows copied from the first expert that had them.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from cmerge import CmergeError, init_state, open_state

transformers = pytest.importorskip("transformers")

V0 = 48
GROWN = ("model.embed_tokens.weight", "lm_head.weight")


def tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_key_value_heads=1, vocab_size=V0, tie_word_embeddings=False, hidden_size=16,
        intermediate_size=32, num_attention_heads=2)).eval()


def grown_expert(base_dir, out, seed, new_rows):
    """An expert of the base (every weight perturbed) whose vocabulary grew by ``new_rows`` random rows."""
    helpers.perturbed_copy(base_dir, out, seed=seed)
    if not new_rows:
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    model.resize_token_embeddings(V0 + new_rows)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name in GROWN:
            w = dict(model.named_parameters())[name]
            w[V0:] = torch.randn(new_rows, w.shape[1], generator=g) * 0.02
    (out / "model.safetensors").unlink()
    model.save_pretrained(str(out))


def cut_back(src, dst):
    """The expert with the base's vocabulary: its grown tensors cut to the base's rows."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copy2(p, dst / p.name)
    sd = load_file(str(src / "model.safetensors"))
    save_file({n: (t[:V0].contiguous() if n in GROWN else t) for n, t in sd.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.fixture
def models(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(str(tmp_path / "base"))
    experts = []
    for i, new_rows in enumerate((3, 0, 5)):  # grows by 3, keeps the base's vocabulary, grows by 5
        experts.append(tmp_path / f"e{i}")
        grown_expert(tmp_path / "base", experts[-1], seed=i, new_rows=new_rows)
    return tmp_path / "base", experts


def test_union_merges_shared_rows_and_keeps_each_new_row_from_the_first_expert(models, tmp_path, cli):
    base, experts = models
    assert cli("merge", "--base", base, *experts, "--vocab", "union", "-o", tmp_path / "out", "-q").exit_code == 0
    cut = []
    for e in experts:
        cut.append(tmp_path / f"{e.name}-cut")
        cut_back(e, cut[-1])
    assert cli("merge", "--base", base, *cut, "-o", tmp_path / "ref", "-q").exit_code == 0

    out, ref = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert set(out) == set(ref)
    e0, e2 = (load_file(str(e / "model.safetensors")) for e in (experts[0], experts[2]))
    for name, t in ref.items():
        if name in GROWN:
            assert out[name].shape == (V0 + 5, t.shape[1])
            assert torch.equal(out[name][:V0], t)                       # the shared rows: the same merge
            assert torch.equal(out[name][V0:V0 + 3], e0[name][V0:])    # rows the first expert added
            assert torch.equal(out[name][V0 + 3:], e2[name][V0 + 3:])  # the rows only the third one has
        else:
            assert torch.equal(out[name], t)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == V0 + 5
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    logits = model(torch.tensor([[1, V0 + 4]])).logits
    assert logits.shape == (1, 2, V0 + 5) and bool(torch.isfinite(logits).all())


def test_the_state_records_the_rows_and_refuses_a_lora_export(models, tmp_path):
    base, experts = models
    st = init_state(tmp_path / "s", base, "task_arithmetic", vocab="union")
    st.add(experts[0])
    assert st.info()["vocab"] == {"mode": "union", "new_rows": {n: 3 for n in GROWN},
                                  "tokenizer_from": str(experts[0])}
    st.add(experts[1])  # no new rows: the union is carried into the new generation
    assert sorted(open_state(tmp_path / "s").vocab_rows()) == sorted(GROWN)
    assert open_state(tmp_path / "s").manifest.format_version == 2
    with pytest.raises(CmergeError, match="cannot carry new embedding rows"):
        st.export_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    shutil.rmtree(experts[0])  # the expert whose tokenizer and config the export would take is gone
    st.export(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == V0 + 3
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"].shape[0] == V0 + 3


def test_without_union_the_grown_expert_is_refused_and_nothing_changes(models, tmp_path, cli):
    base, experts = models
    assert cli("init", tmp_path / "s", "--base", base, "-q").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    res = cli("add", tmp_path / "s", experts[0], "-q")
    helpers.assert_one_sentence_error(res, "its vocabulary grew", "--vocab union")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before
    assert open_state(tmp_path / "s").steps == [] and open_state(tmp_path / "s").manifest.format_version == 1


def test_a_nonfinite_new_row_is_refused(models, tmp_path):
    base, experts = models
    sd = load_file(str(experts[2] / "model.safetensors"))
    sd["lm_head.weight"][V0 + 1, 0] = float("nan")
    save_file(sd, str(experts[2] / "model.safetensors"), metadata={"format": "pt"})
    st = init_state(tmp_path / "s", base, vocab="union")
    with pytest.raises(CmergeError, match="new vocabulary rows of 'lm_head.weight' contain NaN"):
        st.add(experts[2])
    assert open_state(tmp_path / "s").steps == []

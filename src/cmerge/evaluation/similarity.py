"""Task-vector geometry, streamed tensor by tensor (OPCM paper Fig. 4 and Theorem 5.2).

τ_i = θ_i − θ0 is one flat vector over every floating-point tensor of the model
(integer buffers are skipped). The Gram matrix G_ij = ⟨τ_i, τ_j⟩ is accumulated in
float64 one tensor name at a time, and within a tensor over bounded chunks of
elements, so only one tensor per model is ever held: the matrix can be computed for
models larger than memory. Cosine similarity is G_ij / √(G_ii G_jj); a zero task
vector gives NaN in its row and column.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from cmerge.io import TensorSource, open_source
from cmerge.errors import CmergeError

CHUNK_ELEMENTS = 1 << 22


def _check_same_names(base: TensorSource, source: TensorSource) -> None:
    missing = set(base.keys()) - set(source.keys())
    extra = set(source.keys()) - set(base.keys())
    if missing:
        raise CmergeError(f"{source.description} lacks tensor {sorted(missing)[0]!r} of the base model.")
    if extra:
        raise CmergeError(f"{source.description} has tensor {sorted(extra)[0]!r}, which the base model does not have.")


def _check_shape(name: str, base: TensorSource, source: TensorSource) -> None:
    want, got = base.meta(name).shape, source.meta(name).shape
    if want != got:
        raise CmergeError(f"{source.description} has shape {got} for tensor {name!r} but the base has {want}.")


def task_vector_gram(
    base: Any, models: Sequence[Any], labels: Sequence[str] | None = None, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """G_ij = ⟨θ_i − θ0, θ_j − θ0⟩ over every floating-point tensor, in float64 (n × n)."""
    labels = list(labels) if labels is not None else [f"model {i + 1}" for i in range(len(models))]
    base_src = open_source(base, "the base model")
    sources = [open_source(m, label) for m, label in zip(models, labels)]
    for source in sources:
        _check_same_names(base_src, source)
    gram = torch.zeros(len(models), len(models), dtype=torch.float64)
    for name in base_src.keys():
        if not base_src.meta(name).dtype.is_floating_point:
            continue
        for source in sources:
            _check_shape(name, base_src, source)
        b = base_src.get(name).reshape(-1)
        flats = [source.get(name).reshape(-1) for source in sources]
        for start in range(0, b.numel(), chunk_elements):
            stop = start + chunk_elements
            b64 = b[start:stop].to(torch.float64)
            tau = torch.stack([f[start:stop].to(torch.float64) - b64 for f in flats])
            gram += tau @ tau.T
    return gram.numpy()


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix G_ij / √(G_ii G_jj); the diagonal of a nonzero vector is exactly 1."""
    norms = np.sqrt(np.diag(gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / np.outer(norms, norms)
    np.fill_diagonal(cos, np.where(norms > 0, 1.0, np.nan))
    return np.clip(cos, -1.0, 1.0)


def cosine_similarity_matrix(base: Any, models: Sequence[Any], labels: Sequence[str] | None = None) -> np.ndarray:
    """Pairwise cosine similarity of the task vectors θ_i − θ0 (the paper's Fig. 4), float64."""
    return cosine_from_gram(task_vector_gram(base, models, labels))


def delta_norm(model: Any, base: Any, chunk_elements: int = CHUNK_ELEMENTS) -> float:
    """‖θ − θ0‖: one global L2 norm over every floating-point tensor, accumulated in float64."""
    gram = task_vector_gram(base, [model], labels=["the model"], chunk_elements=chunk_elements)
    return float(np.sqrt(gram[0, 0]))

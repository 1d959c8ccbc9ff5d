"""Task-vector cosine similarity and norms, streamed, against a direct float64 computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cmerge.errors import CmergeError
from cmerge.evaluation.similarity import cosine_from_gram, cosine_similarity_matrix, delta_norm, task_vector_gram


def _model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(24, 16, generator=g).to(dtype),
        "layer.bias": torch.randn(24, generator=g).to(dtype),
        "norm.weight": torch.randn(16, generator=g).to(dtype),
        "position_ids": torch.arange(7),  # integer buffer: not part of any task vector
    }


def _direct_cosine(base, models) -> np.ndarray:
    names = [n for n in sorted(base) if base[n].is_floating_point()]
    flat = lambda sd: torch.cat([sd[n].double().reshape(-1) for n in names])  # noqa: E731
    taus = torch.stack([flat(m) - flat(base) for m in models])
    norms = taus.norm(dim=1)
    return ((taus @ taus.T) / torch.outer(norms, norms)).numpy()


def test_cosine_matches_direct_float64():
    base = _model(0)
    models = [{k: v + 0.1 * _model(i)[k] if v.is_floating_point() else v for k, v in base.items()} for i in (1, 2, 3)]
    # make two task vectors correlated so the matrix is not trivially diagonal
    models[2] = {k: (models[1][k] + 0.5 * models[2][k]) / 1.5 if v.is_floating_point() else v
                 for k, v in models[2].items()}
    got = cosine_similarity_matrix(base, models)
    want = _direct_cosine(base, models)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, got.T, atol=0)
    assert np.all(np.diag(got) == 1.0)


def test_chunking_does_not_change_the_gram():
    base = _model(0)
    models = [_model(i) for i in (1, 2)]
    np.testing.assert_allclose(task_vector_gram(base, models, chunk_elements=5),
                               task_vector_gram(base, models), rtol=1e-12)


def test_reads_files_lazily_in_storage_dtype(tmp_path):
    base, models = _model(0, torch.bfloat16), [_model(i, torch.bfloat16) for i in (1, 2)]
    paths = []
    for i, sd in enumerate([base, *models]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
    got = cosine_similarity_matrix(str(paths[0]), [str(p) for p in paths[1:]])
    np.testing.assert_allclose(got, _direct_cosine(base, models), atol=1e-12)


def test_delta_norm_is_global_l2():
    base, model = _model(0), _model(1)
    want = torch.sqrt(sum(((model[k].double() - base[k].double()) ** 2).sum()
                          for k in base if base[k].is_floating_point())).item()
    assert delta_norm(model, base) == pytest.approx(want, rel=1e-12)
    assert delta_norm(base, base) == 0.0


def test_zero_task_vector_gives_nan_row():
    base = _model(0)
    cos = cosine_similarity_matrix(base, [base, _model(1)])
    assert np.isnan(cos[0]).all() and np.isnan(cos[:, 0]).all()
    assert cos[1, 1] == 1.0
    assert np.isnan(cosine_from_gram(np.zeros((1, 1)))[0, 0])


def test_mismatched_models_are_refused():
    base = _model(0)
    missing = {k: v for k, v in _model(1).items() if k != "layer.bias"}
    with pytest.raises(CmergeError, match="lacks tensor 'layer.bias'"):
        cosine_similarity_matrix(base, [missing], labels=["expert x"])
    reshaped = dict(_model(1), **{"layer.weight": torch.zeros(16, 24)})
    with pytest.raises(CmergeError, match="shape"):
        cosine_similarity_matrix(base, [reshaped])

"""Post-merge representation alignment (holistic CMM, arXiv 2509.23592, "post-merging").

After a merge step, the merged model's features drift from those of the model before the
step. On current-task inputs only, the final projection is corrected so that the merged
features match the previous model's: with H the inputs of the final projection under the
merged model (N × d) and Y the previous model's features (N × p),

    min_{W, b}  (1/N) ‖H Wᵀ + 1 bᵀ − Y‖² + ρ ‖W − W_cur‖²

a ridge regression pulled towards the current weights W_cur. It has a closed form
(:func:`ridge_linear`; :func:`ridge_diagonal` for a per-feature affine map such as a final
LayerNorm's γ, β). :func:`gradient_align` is the reference code's route: Adam on the same
loss (MSE or L1) for a fixed number of steps.
"""
from __future__ import annotations

from typing import Literal

import torch


def ridge_linear(h: torch.Tensor, y: torch.Tensor, w_cur: torch.Tensor, b_cur: torch.Tensor | None = None,
                 ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form minimiser of (1/N)‖H Wᵀ + b − Y‖² + ρ‖W − W_cur‖² (b unpenalised; no b if b_cur is None).

    Normal equations in float64: W = (Ycᵀ Hc / N + ρ W_cur)(Hcᵀ Hc / N + ρ I)⁻¹, b = ȳ − W h̄,
    with Hc, Yc centred when there is a bias and uncentred otherwise.
    """
    h64, y64, w64 = h.double(), y.double(), w_cur.double()
    n, d = h64.shape
    if b_cur is not None:
        h_mean, y_mean = h64.mean(0), y64.mean(0)
        h64, y64 = h64 - h_mean, y64 - y_mean
    gram = h64.T @ h64 / n + ridge * torch.eye(d, dtype=torch.float64, device=h.device)
    rhs = y64.T @ h64 / n + ridge * w64
    w = torch.linalg.solve(gram, rhs.T).T  # gram is symmetric
    b = None if b_cur is None else (y_mean - w @ h_mean).to(b_cur.dtype)
    return w.to(w_cur.dtype), b


def ridge_diagonal(u: torch.Tensor, y: torch.Tensor, gamma_cur: torch.Tensor, beta_cur: torch.Tensor | None = None,
                   ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-feature version of :func:`ridge_linear`: y_j ≈ γ_j u_j + β_j (e.g. a final LayerNorm's affine).

    γ_j = (cov(u_j, y_j) + ρ γ_cur,j) / (var(u_j) + ρ), β_j = ȳ_j − γ_j ū_j (moments over the N rows).
    """
    u64, y64 = u.double(), y.double()
    if beta_cur is not None:
        u_mean, y_mean = u64.mean(0), y64.mean(0)
        u64, y64 = u64 - u_mean, y64 - y_mean
    gamma = ((u64 * y64).mean(0) + ridge * gamma_cur.double()) / ((u64 * u64).mean(0) + ridge)
    beta = None if beta_cur is None else (y_mean - gamma * u_mean).to(beta_cur.dtype)
    return gamma.to(gamma_cur.dtype), beta


def feature_discrepancy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared feature distance (1/N) Σ ‖f(x) − f_prev(x)‖²."""
    return float(((pred.double() - target.double()) ** 2).sum(dim=1).mean())


def apply_map(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, diagonal: bool) -> torch.Tensor:
    out = h * w if diagonal else h @ w.T
    return out if b is None else out + b


def gradient_align(h: torch.Tensor, y: torch.Tensor, w_cur: torch.Tensor, b_cur: torch.Tensor | None = None, *,
                   diagonal: bool = False, loss: Literal["mse", "l1"] = "mse", lr: float = 1e-3, steps: int = 200,
                   batch_size: int | None = None, ridge: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference code's alignment: Adam on the feature loss over the map's parameters only."""
    gen = torch.Generator().manual_seed(seed)
    w = w_cur.detach().clone().float().requires_grad_(True)
    b = None if b_cur is None else b_cur.detach().clone().float().requires_grad_(True)
    params = [w] + ([b] if b is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    h32, y32, w0 = h.float(), y.float(), w_cur.detach().float()
    n = h32.shape[0]
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch_size] if batch_size else slice(None)
        pred = apply_map(h32[idx], w, b, diagonal)
        diff = pred - y32[idx]
        value = diff.pow(2).sum(1).mean() if loss == "mse" else diff.abs().sum(1).mean()
        if ridge:
            value = value + ridge * (w - w0).pow(2).sum()
        opt.zero_grad()
        value.backward()
        opt.step()
    return w.detach().to(w_cur.dtype), None if b is None else b.detach().to(b_cur.dtype)

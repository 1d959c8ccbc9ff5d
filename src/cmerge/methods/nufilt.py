"""NUFILT — null-space filtering for data-free continual merging (Qiu et al., ICLR 2026, arXiv 2509.21413).

Written from the authors' public implementation (its adapter module and merging loop; the
files are named in docs/methods.md, "NUFILT", with every default and difference).

Stored per tensor: M_t = θ_merged − θ0. For a selected linear-layer weight (out × in) at step
t ≥ 2, with D = M_{t−1} the merged task vector and T = τ_t = θ_t − θ0:

- filter: V_p = the top r_p right singular vectors of D (r_p = 128, capped by D's rank),
  P = I − V_p V_pᵀ, so T P does not act on the inputs D acts on most (T P V_p = 0);
- adapter: B (in × r) = 0, A (r × in) ~ N(0, 0.02²), r = 64, fitted by 50 Adam steps (lr 1e-3) on
  the projection surrogate, with M(A, B) = D + T P + T B A the merged update and V_g the top
  8 right singular vectors of T,

      L(A, B) = ‖T V_g − M V_g‖_F² + ‖D V_p − M V_p‖_F²

  (the new model's response on its own main inputs, the old merged model's on its main inputs);
- fuse: M_t = D + T (P + B A).

At t = 1 a selected weight takes T unfiltered (there is no earlier update). Every tensor the
rule does not select (biases, norms, embeddings, unselected linear weights) follows ``others``:
kept at θ0 (the reference), added (θ ← θ + τ), or the running mean of the experts.
"""
from __future__ import annotations

import zlib
from typing import Any

import torch

from ..linalg import svd_factors
from ._solvers import Adam
from .base import DeltaMethod, Param, TensorStep, TensorUpdate

__all__ = ["NUFILT", "top_right_vectors", "nufilt_update", "adapter_init"]


def top_right_vectors(x: torch.Tensor, r: int) -> torch.Tensor:
    """The top min(r, rank) right singular vectors of x (n × r'), float64; rank counts s_i > max(m, n)·eps·s_1.

    Directions with a zero singular value are an arbitrary basis of a null space, so they are not
    returned (an all-zero x gives none).
    """
    n = x.shape[1]
    if r <= 0 or not bool(torch.any(x)):
        return torch.zeros(n, 0, dtype=torch.float64, device=x.device)
    _, s, v = svd_factors(x)
    rank = int(torch.count_nonzero(s > max(x.shape) * torch.finfo(torch.float64).eps * s[0]))
    return v[:, :min(r, rank)]


def adapter_init(seed: int, t: int, name: str, rank: int, n: int, std: float) -> torch.Tensor:
    """A (rank × n) ~ N(0, std²), drawn in float64 on the CPU from a generator seeded by (seed, t, name)."""
    key = (seed * 1_000_003 + t * 7_919 + zlib.crc32(name.encode())) % (2 ** 63)
    g = torch.Generator().manual_seed(key)
    return torch.randn(rank, n, generator=g, dtype=torch.float64) * std


def nufilt_update(d: torch.Tensor, tau: torch.Tensor, a0: torch.Tensor | None, *, null_rank: int = 128,
                  grad_rank: int = 8, steps: int = 50, lr: float = 1e-3,
                  history: list | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """M_t = D + T (P + B A) for one weight, with (A, B) fitted from (a0, 0); in T's dtype.

    ``a0``: the adapter's initial A (r × in); None or r = 0 (or ``steps`` = 0) means no adapter
    (B A = 0, the filter alone). ``history``, if given, receives the loss before every Adam step
    and after the last. Returns (M_t, info) with info = {"null_rank": r_p, "grad_rank": r_g,
    "loss": [first, last] or []}.
    """
    dtype = tau.dtype
    vp = top_right_vectors(d, null_rank).to(dtype)
    t_vp = tau @ vp
    filtered = tau - t_vp @ vp.mT  # T P, P = I − V_p V_pᵀ
    info: dict[str, Any] = {"null_rank": vp.shape[1], "grad_rank": 0, "loss": []}
    if a0 is None or a0.shape[0] == 0 or steps == 0:
        return d + filtered, info
    a = a0.to(device=tau.device, dtype=dtype).clone()
    b = torch.zeros(a.shape[1], a.shape[0], dtype=dtype, device=tau.device)
    vg = top_right_vectors(tau, grad_rank).to(dtype)  # grad_rank 0: no plasticity term (n × 0)
    info["grad_rank"] = vg.shape[1]
    # the residuals with the adapter off: T V_g − (D + T P) V_g = T V_p V_pᵀ V_g − D V_g, and
    # D V_p − (D + T P) V_p = −T P V_p = 0 (P V_p = 0)
    loss_grad = _subspace_loss(tau, t_vp @ (vp.mT @ vg) - d @ vg, vg, vp)
    opt = Adam([a, b], lr)
    losses = []
    for _ in range(steps):
        loss, grads = loss_grad(a, b)
        losses.append(loss)
        opt.step(grads)
    losses.append(loss_grad(a, b)[0])
    if history is not None:
        history.extend(losses)
    info["loss"] = [losses[0], losses[-1]]
    return d + filtered + (tau @ b) @ a, info


def _subspace_loss(tau, e1, vg, vp):
    """L = ‖E1 − K A V_g‖² + ‖K A V_p‖² with K = T B, and its gradients in A and B."""
    def loss_grad(a, b):
        k = tau @ b
        z1, z2 = a @ vg, a @ vp
        r1 = e1 - k @ z1
        r2 = -(k @ z2)
        loss = float(torch.sum(r1 * r1)) + float(torch.sum(r2 * r2))
        d_k = (r1 @ z1.mT).add_(r2 @ z2.mT).mul_(-2.0)
        d_a = (k.mT @ r1) @ vg.mT
        d_a.add_((k.mT @ r2) @ vp.mT).mul_(-2.0)
        return loss, [d_a, tau.mT @ d_k]
    return loss_grad


class NUFILT(DeltaMethod):
    name = "nufilt"
    summary = "Null-space filtering + a data-free low-rank adapter, fused into the weights (Qiu et al. 2026)."
    params = (
        Param("null_rank", int, 128, "r_p: top right singular directions of the merged update kept out of the new "
              "task vector (capped by its rank).", minimum=0),
        Param("lora_rank", int, 64, "rank r of the adapter B A (0: the filter alone).", minimum=0),
        Param("grad_rank", int, 8, "top right singular directions of the new task vector on which the merged "
              "update must reproduce it (0: no such term; the adapter then stays at B A = 0).", minimum=0),
        Param("steps", int, 50, "Adam steps of the adapter fit.", minimum=0),
        Param("lr", float, 1e-3, "Adam learning rate of the adapter fit.", minimum=0.0, exclusive_minimum=True),
        Param("init_std", float, 0.02, "standard deviation of the adapter's A at initialisation (B starts at 0).",
              minimum=0.0),
        Param("init_seed", int, 0, "seed of the adapter initialisation (drawn per step and tensor name)."),
        Param("layers", str, "", "comma-separated name fragments of the linear weights to filter (reference on "
              "CLIP: 'attn,fc1'); empty: every linear-layer weight."),
        Param("others", str, "base", "every other tensor: 'base' stays at θ0 (reference), 'add' θ ← θ + τ, "
              "'average' the running mean of the experts.", ("base", "add", "average")),
    )

    def validate(self) -> None:
        self.fragments = tuple(f.strip() for f in self.p["layers"].split(",") if f.strip())

    def selected(self, name: str, projected: bool) -> bool:
        return projected and (not self.fragments or any(f in name for f in self.fragments))

    def elementwise(self, projected: bool) -> bool:
        return not projected  # selected weights need whole-matrix SVDs; the rest is element by element

    def _update(self, name: str, t: int, d: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, list]:
        p = self.p
        a0 = adapter_init(p["init_seed"], t, name, p["lora_rank"], tau.shape[1], p["init_std"])
        new, info = nufilt_update(d, tau, a0, null_rank=p["null_rank"], grad_rank=p["grad_rank"], steps=p["steps"],
                                  lr=p["lr"])
        return new, [info["null_rank"], info["grad_rank"], *info["loss"]]

    def rule(self, s: TensorStep) -> TensorUpdate:
        p = self.p
        if self.selected(s.name, s.projected):
            if s.t == 1:
                return TensorUpdate({"M": s.tau}, note=[0, 0])
            if s.tau.ndim == 3:  # a stack of experts' linear weights (MoE): each matrix on its own
                done = [self._update(f"{s.name}[{e}]", s.t, s.acc["M"][e], s.tau[e]) for e in range(s.tau.shape[0])]
                return TensorUpdate({"M": torch.stack([x for x, _ in done])}, note=done[0][1])
            new, note = self._update(s.name, s.t, s.acc["M"], s.tau)
            return TensorUpdate({"M": new}, note=note)
        if p["others"] == "base":
            return TensorUpdate({"M": torch.zeros_like(s.tau) if s.t == 1 else s.acc["M"]})
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        own = s.tau if s.tau_owned else s.tau.clone()
        m = s.acc["M"]
        return TensorUpdate({"M": own.add_(m) if p["others"] == "add" else own.sub_(m).div_(s.t).add_(m)})

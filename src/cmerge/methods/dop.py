"""DOP — dual projections for continual merging without data (Yang et al., NeurIPS 2025).

docs/methods.md ("DOP") has every equation, default and difference from the reference code.

Stored per tensor: M_t = θ_merged − θ0, with M_1 = τ_1 (the first expert is the first merged
model). Step t ≥ 2, for every linear-layer weight: with the two targets τ_1 = M_{t−1} (the
merged task vector) and τ_2 = θ_t − θ0, and for each the k_i top singular triplets
U_i diag(s_i) V_iᵀ of τ_i, k_i = #{j : (s_1 + … + s_j) / Σ s < ε} (ε = 0.99999),

    L_i(W) = ‖diag(s_i) U_iᵀ (W − τ_i)‖_F² + ‖(W − τ_i) V_i diag(s_i)‖_F²

and the new merged task vector W minimises c_1 L_1 + c_2 L_2 (W = θ − θ0: every term is a
difference, so this is the reference's loss on weights). Two solvers:

- ``adam`` (published): W starts at (τ_1 + τ_2) / 2 and takes ``steps`` Adam steps; before each,
  c = EMA_β of the MGDA weights (min-norm point of the two loss-normalised gradients), the EMA
  starting from (α, 1 − α).
- ``exact``: L is quadratic, so for fixed c the minimiser solves the Sylvester equation

      A W + W B = Σ c_i (A_i τ_i + τ_i B_i),  A_i = U_i S_i² U_iᵀ,  B_i = V_i S_i² V_iᵀ,  A = Σ c_i A_i, …

  solved in the eigenbases of A and B: W̃_jl = R̃_jl / (a_j + b_l); where a_j and b_l are both
  (numerically) zero the loss does not see W and the start point is kept. c comes from
  ``weights``: the published solver's EMA with W held at the start point, or given numbers.

Every other tensor: (M_{t−1} + τ_t) / 2 (the reference's pairwise average) or the running mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CmergeError
from ..linalg import svd_factors
from ._solvers import Adam
from .base import DeltaMethod, Param, TensorStep, TensorUpdate

__all__ = ["DOP", "mass_rank", "top_triplets", "mgda_weight", "dop_loss", "solve_adam", "solve_exact",
           "schedule_weights"]

# An eigenvalue of A or B at most this fraction of (a_max + b_max) counts as zero (exact solver).
NULL_TOL = 1e-10


def mass_rank(s: torch.Tensor, eps: float) -> int:
    """k = #{j : c_j < eps}, c_j = (s_1 + … + s_j) / Σ s, in float64 with the last c set to 1.

    The reference's ``searchsorted(cumsum / sum, eps)``: the pair whose share crosses eps is
    not kept. eps ≥ 1 keeps every pair; an all-zero spectrum keeps none.
    """
    s64 = s.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    total = s64.sum()
    if s64.numel() == 0 or not total > 0:
        return 0
    if eps >= 1.0:
        return s64.numel()
    c = torch.cumsum(s64, 0) / total
    c[-1] = 1.0
    return int(torch.count_nonzero(c < eps))


def top_triplets(tau: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_k (m × k), s_k, V_k (n × k) of τ's top k = mass_rank(s, eps) singular triplets, float64."""
    m, n = tau.shape
    if not bool(torch.any(tau)):
        z = torch.zeros(0, dtype=torch.float64, device=tau.device)
        return z.new_zeros(m, 0), z, z.new_zeros(n, 0)
    u, s, v = svd_factors(tau)
    k = mass_rank(s, eps)
    return u[:, :k], s[:k], v[:, :k]


def mgda_weight(v11: float, v12: float, v22: float) -> float:
    """γ minimising ‖γ g_1 + (1 − γ) g_2‖² for two gradients with the given inner products.

    As the reference's two-task min-norm solver: 0.999 if v12 ≥ v11, 0.001 if v12 ≥ v22
    (the ends are never exactly 0 or 1), the interior minimum otherwise.
    """
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return (v22 - v12) / (v11 + v22 - 2 * v12)


@dataclass
class _Term:
    """L_i for one target τ_i, in one dtype: its Hessian map X ↦ A_i X + X B_i and A_i τ_i + τ_i B_i."""

    target: torch.Tensor
    u: torch.Tensor          # m × k
    s2: torch.Tensor         # k
    sv: torch.Tensor         # k × n, diag(s) Vᵀ
    a: torch.Tensor | None   # A_i = U S² Uᵀ when stored whole (else applied through the factors)
    b: torch.Tensor | None   # B_i = V S² Vᵀ likewise
    use_u: bool
    use_v: bool
    rhs: torch.Tensor        # A_i τ_i + τ_i B_i

    @classmethod
    def build(cls, tau: torch.Tensor, triplets, proj_space: str, dtype: torch.dtype) -> "_Term":
        u, s, v = triplets
        m, n = tau.shape
        k = s.numel()
        use_u, use_v = "u" in proj_space, "v" in proj_space
        us2 = u * s.square()
        sv = (v * s).mT
        # A_i τ_i = U S² Uᵀ τ = U S³ Vᵀ and τ_i B_i = τ V S² Vᵀ = U S³ Vᵀ (Uᵀτ = S Vᵀ, τV = U S)
        rhs = ((int(use_u) + int(use_v)) * us2) @ sv
        a = (us2 @ u.mT).to(dtype) if use_u and m <= 2 * k else None
        b = (sv.mT @ sv).to(dtype) if use_v and n <= 2 * k else None
        return cls(tau.to(dtype), u.to(dtype), s.square().to(dtype), sv.to(dtype), a, b, use_u, use_v,
                   rhs.to(dtype))

    def hess(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        if self.s2.numel() == 0:
            return out
        if self.use_u:
            out += self.a @ x if self.a is not None else self.u @ (self.s2[:, None] * (self.u.mT @ x))
        if self.use_v:
            out += x @ self.b if self.b is not None else (x @ self.sv.mT) @ self.sv
        return out

    def grad_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """∇L_i(X) = 2 (A_i Δ + Δ B_i) and L_i(X) = ⟨Δ, A_i Δ + Δ B_i⟩, Δ = X − τ_i."""
        half = self.hess(x).sub_(self.rhs)
        loss = float(torch.sum((x - self.target) * half))
        return half.mul_(2.0), loss


def dop_loss(w: torch.Tensor, tau: torch.Tensor, eps: float, proj_space: str = "uv") -> float:
    """L_i(W) for the target τ_i (float64), as written: ‖diag(s) Uᵀ Δ‖² + ‖Δ V diag(s)‖², Δ = W − τ."""
    u, s, v = top_triplets(tau, eps)
    d = w.to(torch.float64) - tau.to(torch.float64)
    out = 0.0
    if "u" in proj_space:
        out += float(torch.sum((s[:, None] * (u.mT @ d)) ** 2))
    if "v" in proj_space:
        out += float(torch.sum(((d @ v) * s) ** 2))
    return out


def _mgda_weight_of(grads, losses) -> float:
    """MGDA's γ for two gradients normalised by their losses (L_i = 0 ⇒ ∇L_i = 0: nothing to weigh)."""
    scale = [1.0 / loss if loss > 0 else 0.0 for loss in losses]
    g1, g2 = grads
    v11 = float(torch.sum(g1 * g1)) * scale[0] ** 2
    v12 = float(torch.sum(g1 * g2)) * scale[0] * scale[1]
    v22 = float(torch.sum(g2 * g2)) * scale[1] ** 2
    return mgda_weight(v11, v12, v22)


def solve_adam(t1: torch.Tensor, t2: torch.Tensor, *, eps: float = 0.99999, steps: int = 200, lr: float = 1e-4,
               alpha: float = 0.8, beta: float = 0.999, mgda: bool = True, ema: bool = True,
               proj_space: str = "uv", history: list | None = None) -> tuple[torch.Tensor, tuple[float, float], tuple[int, int]]:
    """The published solver: ``steps`` Adam steps on c_1 L_1 + c_2 L_2 from (τ_1 + τ_2) / 2.

    Before each step: the two gradients, MGDA's γ (loss-normalised gradients), then
    c = β c + (1 − β) (γ, 1 − γ) from c = (α, 1 − α) (``ema``), or c = (γ, 1 − γ) (no ``ema``),
    or c = (α, 1 − α) throughout (no ``mgda``). Runs in the inputs' dtype (the singular triplets
    are computed in float64). ``history``, if given, receives ((L_1, L_2), c_1) at each step, before it.
    Returns (W, the last c, (k_1, k_2)).
    """
    dtype = t1.dtype
    trips = [top_triplets(t, eps) for t in (t1, t2)]
    terms = [_Term.build(t, tr, proj_space, dtype) for t, tr in zip((t1, t2), trips)]
    x = (t1 + t2).mul_(0.5)  # the reference's start: the average of the two weights
    opt = Adam([x], lr)
    c = (alpha, 1.0 - alpha)
    for _ in range(steps):
        grads, losses = zip(*(t.grad_loss(x) for t in terms))
        if mgda:
            gamma = _mgda_weight_of(grads, losses)
            sol = (gamma, 1.0 - gamma)
            c = (beta * c[0] + (1 - beta) * sol[0], beta * c[1] + (1 - beta) * sol[1]) if ema else sol
        if history is not None:
            history.append((losses, c[0]))
        opt.step([grads[0].mul_(c[0]).add_(grads[1], alpha=c[1])])
    return x, c, (trips[0][1].numel(), trips[1][1].numel())


def schedule_weights(t1: torch.Tensor, t2: torch.Tensor, *, eps: float = 0.99999, steps: int = 200,
                     alpha: float = 0.8, beta: float = 0.999, mgda: bool = True, ema: bool = True,
                     proj_space: str = "uv", triplets=None) -> tuple[float, float]:
    """The exact solver's default c: the published solver's weights with W held at the start point.

    With γ_0 the MGDA weight at W = (τ_1 + τ_2) / 2, ``steps`` EMA updates from α give
    c_1 = β^steps α + (1 − β^steps) γ_0 (``ema``), c_1 = γ_0 (no ``ema``), c_1 = α (no ``mgda``);
    c_2 = 1 − c_1. Computed in float64.
    """
    if not mgda:
        return alpha, 1.0 - alpha
    f64 = torch.float64
    trips = triplets or [top_triplets(t, eps) for t in (t1, t2)]
    delta = (t2.to(f64) - t1.to(f64)) / 2  # W_start − τ_1 = −(W_start − τ_2)
    grads, losses = [], []
    for sign, (u, s, v) in zip((1.0, -1.0), trips):  # through the factors: four m × k × n products each
        g = torch.zeros_like(delta)
        loss = 0.0
        if "u" in proj_space:
            ud = u.mT @ delta
            loss += float(torch.sum((s[:, None] * ud) ** 2))
            g += u @ (s.square()[:, None] * ud)
        if "v" in proj_space:
            dv = delta @ v
            loss += float(torch.sum((dv * s) ** 2))
            g += (dv * s.square()) @ v.mT
        grads.append(g.mul_(2 * sign))
        losses.append(loss)
    gamma = _mgda_weight_of(grads, losses)
    if not ema:
        return gamma, 1.0 - gamma
    keep = beta ** steps
    c1 = keep * alpha + (1 - keep) * gamma
    return c1, keep * (1 - alpha) + (1 - keep) * (1 - gamma)


def solve_exact(t1: torch.Tensor, t2: torch.Tensor, c: tuple[float, float], *, eps: float = 0.99999,
                proj_space: str = "uv", triplets=None) -> torch.Tensor:
    """The minimiser of c_1 L_1 + c_2 L_2 (float64 inside, result in the inputs' dtype).

    Solved on the wide side (m ≤ n; the problem is symmetric under transposition with U ↔ V).
    A = Σ c_i U_i S_i² U_iᵀ and B = Σ c_i V_i S_i² V_iᵀ are diagonalised; where the stacked
    bases [U_1, U_2] or [V_1, V_2] have fewer columns than the side, in that span (an
    orthonormal basis from a QR; the rest of the space has eigenvalue 0). When A has no zero
    eigenvalue and B's span is smaller than n, the n-side basis is never formed: W = Y T with
    T = [√c_i diag(s_i) V_iᵀ]_i stacked (K × n) and A Y + Y T Tᵀ = [2 √c_i U_i S_i²]_i, a
    Sylvester equation of size m × K solved in the eigenbases of A and T Tᵀ (K × K).
    Eigenvalues at most NULL_TOL · (a_max + b_max) count as zero; entries whose a_j and b_l are
    both zero keep the start point (τ_1 + τ_2) / 2.
    """
    dtype = t1.dtype
    f64 = torch.float64
    tall = t1.shape[0] > t1.shape[1]
    if tall:
        t1, t2 = t1.mT, t2.mT
        proj_space = {"u": "v", "v": "u"}.get(proj_space, proj_space)
        triplets = [(v, s, u) for u, s, v in triplets] if triplets is not None else None
    trips = triplets or [top_triplets(t, eps) for t in (t1, t2)]
    a1, a2 = t1.to(f64), t2.to(f64)
    x0 = (a1 + a2) / 2
    m, n = x0.shape
    blocks = [(u, s, v, ci) for (u, s, v), ci in zip(trips, c) if ci > 0 and s.numel() > 0]
    if not blocks:
        out = x0
    else:
        use_u, use_v = "u" in proj_space, "v" in proj_space
        w = int(use_u) + int(use_v)
        k_sum = sum(s.numel() for _, s, _, _ in blocks)
        p, a = _eig_of_sum([(u, ci * s.square()) for u, s, _, ci in blocks], m) if use_u else (None, None)
        if use_u and use_v and k_sum < n and p.shape[1] == m and float(a.min()) > NULL_TOL * _scale_uv(a, blocks):
            out = _solve_implicit(blocks, p, a, w)
        else:
            q, b = _eig_of_sum([(v, ci * s.square()) for _, s, v, ci in blocks], n) if use_v else (None, None)
            rhs = sum((w * ci) * (u * s ** 3) @ v.mT for u, s, v, ci in blocks)
            out = _solve_explicit(rhs, x0, p, a, q, b)
    out = out.to(dtype)
    return out.mT if tall else out


def _scale_uv(a: torch.Tensor, blocks) -> float:
    # b_max ≤ Σ c_i s_i,max², a cheap bound on B's largest eigenvalue for the tolerance
    return float(a.max()) + sum(ci * float(s[0]) ** 2 for _, s, _, ci in blocks)


def _eig_of_sum(parts: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (dim × p basis, p values) of Σ W_i diag(w_i) W_iᵀ for orthonormal W_i (dim × k_i).

    Whole (p = dim) when Σ k_i ≥ dim; otherwise in an orthonormal basis of span[W_1, W_2]
    (p = Σ k_i; the orthogonal complement has eigenvalue 0 and is not returned).
    """
    k_sum = sum(wi.shape[1] for wi, _ in parts)
    if k_sum >= dim:
        mat = sum((wi * di) @ wi.mT for wi, di in parts)
        vals, vecs = torch.linalg.eigh(mat)
        return vecs, vals
    basis, _ = torch.linalg.qr(torch.cat([wi for wi, _ in parts], dim=1))
    coords = [basis.mT @ wi for wi, _ in parts]
    mat = sum((ci * di) @ ci.mT for ci, (_, di) in zip(coords, parts))
    vals, vecs = torch.linalg.eigh(mat)
    return basis @ vecs, vals


def _solve_explicit(rhs, x0, p, a, q, b) -> torch.Tensor:
    """W from explicit eigenbases P (m × p_a, values a) and Q (n × p_b, values b); None: that side unused."""
    m, n = x0.shape
    a_max = float(a.max()) if a is not None and a.numel() else 0.0
    b_max = float(b.max()) if b is not None and b.numel() else 0.0
    tol = NULL_TOL * (a_max + b_max)
    if p is not None and q is not None:
        rt = p.mT @ rhs @ q
        a_null, b_null = a <= tol, b <= tol
        y = rt / (a[:, None] + b[None, :]).clamp_min(tol if tol > 0 else 1e-300)
        y[a_null[:, None] & b_null[None, :]] = 0.0
        out = p @ y @ q.mT
        p_live, q_live = p[:, ~a_null], q[:, ~b_null]
    elif p is not None:  # B = 0: A W = R on A's range
        live = a > tol
        p_live, q_live = p[:, live], x0.new_zeros(n, 0)
        out = p_live @ ((p_live.mT @ rhs) / a[live][:, None])
    else:  # A = 0: W B = R on B's range
        live = b > tol
        p_live, q_live = x0.new_zeros(m, 0), q[:, live]
        out = ((rhs @ q_live) / b[live][None, :]) @ q_live.mT
    if p_live.shape[1] < m and q_live.shape[1] < n:  # the start point where the loss does not see W
        z = x0 - p_live @ (p_live.mT @ x0)
        out = out + z - (z @ q_live) @ q_live.mT
    return out


def _solve_implicit(blocks, p, a, w) -> torch.Tensor:
    """W = Y T with A Y + Y M = R_Y, M = T Tᵀ (K × K); A nonsingular, so W has no start-point part."""
    sq = [math.sqrt(ci) for _, _, _, ci in blocks]
    t_rows = torch.cat([(sqc * s)[:, None] * v.mT for (_, s, v, _), sqc in zip(blocks, sq)], dim=0)  # K × n
    ks = [s.numel() for _, s, _, _ in blocks]
    mm = t_rows.new_zeros(sum(ks), sum(ks))
    off = [0, ks[0]]
    for i, (_, s, _, ci) in enumerate(blocks):
        mm[off[i]:off[i] + ks[i], off[i]:off[i] + ks[i]] = torch.diag(ci * s.square())
    if len(blocks) == 2:  # √(c1 c2) S1 V1ᵀ V2 S2, from the rows of T
        cross = t_rows[:ks[0]] @ t_rows[ks[0]:].mT
        mm[:ks[0], ks[0]:] = cross
        mm[ks[0]:, :ks[0]] = cross.mT
    beta, e = torch.linalg.eigh(mm)
    r_y = torch.cat([(w * sqc) * (u * s.square()) for (u, s, _, _), sqc in zip(blocks, sq)], dim=1)  # m × K
    y = (p.mT @ r_y @ e) / (a[:, None] + beta.clamp_min(0.0)[None, :])
    return ((p @ y) @ e.mT) @ t_rows


def _parse_weights(text: str) -> tuple[float, float] | str | None:
    """None for "schedule"; "count" as it is; (c1, 1 − c1) for one number; (c1, c2) for two."""
    if text.strip().lower() == "schedule":
        return None
    if text.strip().lower() == "count":
        return "count"
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) == 1 and 0.0 <= vals[0] <= 1.0:
        return vals[0], 1.0 - vals[0]
    if len(vals) == 2 and all(v >= 0 and math.isfinite(v) for v in vals) and sum(vals) > 0:
        return vals[0], vals[1]
    raise CmergeError(f"dop: weights must be 'schedule', 'count', a number c1 in [0, 1] or two numbers 'c1,c2' ≥ 0 "
                      f"(not both 0), got {text!r}.")


class DOP(DeltaMethod):
    name = "dop"
    summary = "Dual projections: per linear weight, min c1·L(merged) + c2·L(new) in both singular subspaces (Yang et al. 2025)."
    params = (
        Param("solver", str, "adam", "'adam': the published 200 Adam steps from the average; 'exact': the closed-form "
              "minimiser of the same loss for fixed weights (Sylvester equation).", ("adam", "exact")),
        Param("steps", int, 200, "Adam steps per weight (and EMA updates of the 'schedule' weights).", minimum=0),
        Param("lr", float, 1e-4, "Adam learning rate (solver adam).", minimum=0.0, exclusive_minimum=True),
        Param("svd_epsilon", float, 0.99999, "ε: keep the top singular pairs of each task vector whose cumulative "
              "share of the singular-value mass is below ε (1 keeps all).", minimum=0.0, maximum=1.0),
        Param("alpha", float, 0.8, "initial weight c1 of the merged model's loss (EMA start), or its fixed weight "
              "with --no-mgda.", minimum=0.0, maximum=1.0),
        Param("ema_beta", float, 0.999, "EMA factor β of the MGDA weights.", minimum=0.0, maximum=1.0),
        Param("mgda", bool, True, "choose the weights by MGDA (min-norm point of the loss-normalised gradients)."),
        Param("ema", bool, True, "smooth the MGDA weights with the EMA."),
        Param("proj_space", str, "uv", "loss terms: 'uv' both projections (published), 'u' left only, 'v' right only.",
              ("uv", "u", "v")),
        Param("weights", str, "schedule", "exact solver's c: 'schedule' (the adam solver's EMA with W held at the "
              "start point), 'count' (c = (t − 1, 1) / t: the merged model weighs as the t − 1 experts it holds; "
              "ours), a number c1 in [0, 1], or 'c1,c2'."),
        Param("others", str, "pairwise", "non-linear tensors: 'pairwise' (merged + new) / 2 (reference) or "
              "'running' mean of the experts.", ("pairwise", "running")),
    )

    def validate(self) -> None:
        self.fixed_weights = _parse_weights(self.p["weights"])
        if self.fixed_weights is not None and self.p["solver"] != "exact":
            raise CmergeError("dop: weights applies to the exact solver; the adam solver takes its weights from "
                              "--alpha, --mgda and --ema.")

    def elementwise(self, projected: bool) -> bool:
        return not projected  # averages element by element; linear weights need whole-matrix SVDs

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        m = s.acc["M"]
        if not s.projected:
            own = s.tau if s.tau_owned else s.tau.clone()
            new = own.add_(m).mul_(0.5) if self.p["others"] == "pairwise" else own.sub_(m).div_(s.t).add_(m)
            return TensorUpdate({"M": new})
        if s.tau.ndim == 3:  # a stack of experts' linear weights (MoE): each matrix on its own
            solved = [self._solve(m[e], s.tau[e], s.t) for e in range(s.tau.shape[0])]
            return TensorUpdate({"M": torch.stack([x for x, _ in solved])}, note=solved[0][1])
        x, note = self._solve(m, s.tau, s.t)
        return TensorUpdate({"M": x}, note=note)

    def _solve(self, m: torch.Tensor, tau: torch.Tensor, t: int) -> tuple[torch.Tensor, list]:
        """The new merged task vector of one weight matrix at step ``t``, and (k_1, k_2, c_1, c_2) for the step
        log."""
        p = self.p
        common = dict(eps=p["svd_epsilon"], proj_space=p["proj_space"])
        sched = dict(steps=p["steps"], alpha=p["alpha"], beta=p["ema_beta"], mgda=p["mgda"], ema=p["ema"])
        if p["solver"] == "adam":
            x, c, ks = solve_adam(m, tau, lr=p["lr"], **common, **sched)
        else:
            trips = [top_triplets(target, p["svd_epsilon"]) for target in (m, tau)]
            c = ((t - 1) / t, 1 / t) if self.fixed_weights == "count" else (
                self.fixed_weights or schedule_weights(m, tau, triplets=trips, **common, **sched))
            x = solve_exact(m, tau, c, triplets=trips, **common)
            ks = (trips[0][1].numel(), trips[1][1].numel())
        return x, [ks[0], ks[1], round(c[0], 6), round(c[1], 6)]

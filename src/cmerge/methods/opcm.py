"""OPCM — orthogonal projection-based continual merging (Tang et al., arXiv 2501.09522).

Stored per tensor: S_t = λ_t (θ_merged − θ0). Then (Eq. 6 and 8, tensor by tensor)

    S_1 = τ_1,   S_t = S_{t−1} + P_{S_{t−1}}(τ_t)

with P the projection of Eq. 9 for linear-layer weights (``linalg.opcm_project``; S and
θ_merged − θ0 share singular vectors) and the identity for every other tensor. λ_t
(Eq. 10) is ‖S_t‖ / N̄_t with N̄_t the mean of the task-vector norms ‖τ_1‖ … ‖τ_t‖ (or
√t, the paper's alternative), so one pass per step suffices and θ_merged = θ0 + S_t / λ_t
(the general-term formula, Eq. 7).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..linalg import KERNELS, opcm_project, opcm_project_batched
from ..lowrank import LowRank, opcm_project_lowrank
from .base import Method, Param, TensorStep, TensorUpdate, sq_norm


class OPCM(Method):
    name = "opcm"
    summary = "Orthogonal projection + adaptive scaling (Tang et al. 2025, Algorithm 1)."
    params = (
        Param("alpha", float, 0.5, "projection threshold α: the top singular directions holding this share of the "
              "merged task vector's singular-value mass are protected (Eq. 9).", minimum=0.0, maximum=1.0),
        Param("keep_diagonal", bool, False, "do not zero the diagonal of UᵀXV: the Jan-2025 reference code's behaviour "
              "(its `.diag().fill_(0)` was a no-op); breaks Theorem 5.1's orthogonality."),
        Param("drop_cross_blocks", bool, False, "also drop the cross blocks C[:k, k:] and C[k:, :k] (the strict reading "
              "of Eq. 9); the reference keeps them."),
        Param("scaling", str, "adaptive", "λ_t rule: 'adaptive' = ‖S_t‖ / mean task-vector norm (Eq. 10), "
              "'sqrt_t' = √t (Sec. 4, Theorem 5.2).", ("adaptive", "sqrt_t")),
        Param("norm_average", str, "raw", "norms averaged in N̄_t: 'raw' ‖τ_i‖ (Eq. 10, reference code) or "
              "'projected' ‖P(τ_i)‖ (Algorithm 1, line 13).", ("raw", "projected")),
        Param("kernel", str, "float64", "arithmetic of the projection: 'float64' exact (a float64 reference to float64 "
              "rounding); 'float32' keeps the float64 eigendecomposition of the r × r Gram matrix and does the three "
              "large products in float32 (~1e-7 relative, below the reference code's float32 error; docs/methods.md, "
              "Kernels).", KERNELS),
    )
    accumulators = ("S",)

    def initial_scalars(self) -> dict[str, Any]:
        return {"lambda": None, "norm_sum": 0.0, "mean_norm": None}

    def elementwise(self, projected: bool) -> bool:
        return not projected  # element by element, except the projection of linear-layer weights (Eq. 9)

    factored = True

    def rule(self, s: TensorStep) -> TensorUpdate:
        if isinstance(s.tau, LowRank):
            return self._rule_factored(s)
        note = None
        if s.t == 1:
            proj = s.tau
        elif s.projected:
            proj, k = self._project(s.acc["S"], s.tau, s.tau if s.tau_owned else None)
            note = [k, min(s.tau.shape[-2:])]
        else:
            proj = s.tau
        proj_sq = sq_norm(proj)
        if s.t == 1:
            new = proj
        elif s.projected or s.tau_owned:  # P(τ) is ours: S_{t−1} + P(τ) without another full-size tensor
            new = proj.add_(s.acc["S"])
        else:
            new = s.acc["S"] + proj
        return TensorUpdate({"S": new}, {"proj_sq": proj_sq, "s_sq": sq_norm(new)}, note)

    def rule_batch(self, steps: list[TensorStep]) -> list[TensorUpdate]:
        """`rule` for consecutive projected 2-D weights of one shape at once (the engine's batched path for GPUs):
        one batched projection (``linalg.opcm_project_batched``), then each weight's update as in `rule`."""
        if any(s.t == 1 or not s.projected or isinstance(s.tau, LowRank) or s.tau.ndim != 2 for s in steps):
            return [self.rule(s) for s in steps]
        x = torch.stack([s.tau for s in steps])
        proj, ks = opcm_project_batched(torch.stack([s.acc["S"] for s in steps]), x, self.p["alpha"], out=x,
                                        keep_diagonal=self.p["keep_diagonal"],
                                        drop_cross_blocks=self.p["drop_cross_blocks"], kernel=self.p["kernel"])
        updates = []
        for p, k, s in zip(proj, ks, steps):
            proj_sq = sq_norm(p)
            new = p.add_(s.acc["S"])
            updates.append(TensorUpdate({"S": new}, {"proj_sq": proj_sq, "s_sq": sq_norm(new)}, [k, min(p.shape)]))
        return updates

    def _project(self, d: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """P(X) (Eq. 9) of one weight, or of each expert's matrix of a 3-D stack (MoE), with its protected rank
        (the mean over the experts of a stack)."""
        opts = dict(keep_diagonal=self.p["keep_diagonal"], drop_cross_blocks=self.p["drop_cross_blocks"],
                    kernel=self.p["kernel"])
        if x.ndim == 2:
            return opcm_project(d, x, self.p["alpha"], out=out, **opts)
        out = torch.empty_like(x) if out is None else out
        ks = [opcm_project(d[e], x[e], self.p["alpha"], out=out[e], **opts)[1] for e in range(x.shape[0])]
        return out, sum(ks) / len(ks)

    def _rule_factored(self, s: TensorStep) -> TensorUpdate:
        """The same rule on factors (docs/methods.md, "OPCM on low-rank task vectors"): the projection of a
        rank-deficient S follows the rule for its nonzero singular values, computed exactly in the span of
        the stacked factors."""
        note = None
        if s.t == 1:
            proj = new = s.tau
        elif s.projected:
            proj, new, k = opcm_project_lowrank(s.acc["S"], s.tau, self.p["alpha"],
                                                keep_diagonal=self.p["keep_diagonal"],
                                                drop_cross_blocks=self.p["drop_cross_blocks"])
            note = [k, min(s.tau.shape)]
        else:
            proj, new = s.tau, LowRank.cat(s.acc["S"], s.tau)
        return TensorUpdate({"S": new}, {"proj_sq": proj.sq_norm(), "s_sq": new.sq_norm()}, note)

    def finalize(self, scalars: Mapping[str, Any], sums: Mapping[str, float], t: int) -> dict[str, Any]:
        n_t = math.sqrt(sums["tau_sq"] if self.p["norm_average"] == "raw" else sums["proj_sq"])
        norm_sum = scalars["norm_sum"] + n_t
        mean_norm = norm_sum / t
        s_norm = math.sqrt(sums["s_sq"])
        if self.p["scaling"] == "sqrt_t":
            lam = math.sqrt(t)
        else:
            lam = s_norm / mean_norm if mean_norm > 0 and s_norm > 0 else 1.0
        return {"lambda": lam, "norm_sum": norm_sum, "mean_norm": mean_norm, "merged_norm": s_norm / lam}

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], *,
               name: str = "") -> torch.Tensor:
        return base + acc["S"] / scalars["lambda"]

    def merged_delta(self, acc: Mapping[str, Any], scalars: Mapping[str, Any], *, name: str = "") -> Any:
        s = acc["S"]
        return s.scaled(1.0 / scalars["lambda"]) if isinstance(s, LowRank) else s / scalars["lambda"]

    def unmerge(self, base: torch.Tensor, merged: torch.Tensor, acc: Mapping[str, torch.Tensor],
                scalars: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """S_t = λ_t (θ_merged − θ0) with the stored λ_t.

        λ_t and N̄_t are kept, so the next step adds P(τ_{t+1}) to λ_t (θ_corrected − θ0)
        exactly as it would have to the uncorrected model, projects against the corrected
        tensor, and rescales by λ_{t+1} = ‖S_{t+1}‖ / N̄_{t+1}. Until then ‖θ_merged − θ0‖ is
        the corrected model's norm, no longer N̄_t.
        """
        return {"S": (merged - base) * scalars["lambda"]}

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        return {"lambda": scalars["lambda"], "mean_norm": scalars["mean_norm"], "merged_norm": scalars["merged_norm"]}

"""Small optimisation helpers shared by the gradient-based rules (``dop``, ``nufilt``).

Pure math, no I/O. The rules write their gradients by hand (no autograd), so they work
whatever grad mode the caller is in, and apply them with :class:`Adam`, which performs
exactly the update of ``torch.optim.Adam`` with its defaults (no weight decay, no
AMSGrad): with g the gradient at step k = 1, 2, …

    m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
    θ ← θ − (lr / (1 − β1^k)) · m / (√v / √(1 − β2^k) + eps)

Both reference implementations (FusionBench's DOP, NUFILT's adapter fit) use
``torch.optim.Adam`` with these defaults; see docs/methods.md.
"""
from __future__ import annotations

import torch

__all__ = ["Adam"]


class Adam:
    """Adam state for a list of tensors that the caller updates in place with :meth:`step`."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.lr, self.beta1, self.beta2, self.eps = lr, betas[0], betas[1], eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.k = 0

    def step(self, grads: list[torch.Tensor]) -> None:
        """One update of every parameter with its gradient (same order as the parameters)."""
        self.k += 1
        step_size = self.lr / (1 - self.beta1 ** self.k)
        bias2_sqrt = (1 - self.beta2 ** self.k) ** 0.5
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)

"""Post-merge representation alignment on the text suite (holistic CMM, "post-merging").

After merging task t, the merged encoder's sentence features on task t's training
inputs are pulled back towards those of the model before the step (θ̄_{t−1}), by
correcting only the last map before the features. CLIP has a final linear projection
for this; all-MiniLM-L6-v2 has none: its features are the mean over tokens of the last
LayerNorm's output, γ ⊙ n(h) + β, so with u = the masked mean of the normalised hidden
states n(h), the feature is exactly the per-dimension affine map γ ⊙ u + β. The final
LayerNorm's γ and β are therefore the "final projection" here, fitted per dimension:

    min_{γ, β}  (1/N) Σ_x ‖γ ⊙ u_t(x) + β − f_{t−1}(x)‖² + ρ ‖γ − γ_cur‖²

in closed form (``alignment.ridge_diagonal``) or with the reference code's Adam loop
(``alignment.gradient_align``). The corrected γ, β go back into the merge state
(``Merger.override``), so the next step merges into the aligned model, as in the
reference. Only current-task inputs are used (no replay); step 1 is left alone (the
model before it is the pre-trained one, which has not learnt anything to keep).
"""
from __future__ import annotations

import copy
import random
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from cmerge.alignment import feature_discrepancy, gradient_align, ridge_diagonal
from cmerge.errors import CmergeError
from cmerge.suites.backbone import embed, load_weights, mean_pool
from cmerge.suites.text import pretokenize
from cmerge.suites.text_data import TextTask

MODES = ("off", "ridge", "adam")


def final_layer_norm(model: torch.nn.Module) -> str:
    """Name of the LayerNorm that produces ``last_hidden_state`` (the last one in a post-LN BERT)."""
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)]
    if not names:
        raise CmergeError("representation alignment needs a final LayerNorm; this encoder has none.")
    return names[-1]


class FinalNormAligner:
    """The runner's ``post_step`` hook that aligns the final LayerNorm's affine after each merge step.

    ``backbone`` supplies the architecture (a private copy is used); ``samples`` training
    inputs per task (a fixed seeded subset) are encoded twice per step. ``ridge`` is ρ
    for the closed form; ``steps`` and ``lr`` drive the Adam version (the reference's
    route, MSE loss).
    """

    def __init__(self, backbone: torch.nn.Module, tokenizer, tasks: Mapping[str, TextTask], *, mode: str = "ridge",
                 samples: int = 128, max_len: int = 48, batch_size: int = 64, ridge: float = 1e-3,
                 steps: int = 200, lr: float = 1e-3, seed: int = 0) -> None:
        if mode not in MODES[1:]:
            raise CmergeError(f"alignment mode must be one of {', '.join(MODES[1:])}, got {mode!r}.")
        self.mode, self.samples, self.ridge, self.steps, self.lr = mode, samples, ridge, steps, lr
        self.model = copy.deepcopy(backbone).eval()
        self.norm = final_layer_norm(self.model)
        self.norm_module = self.model.get_submodule(self.norm)
        self.batches = {}
        for name, task in tasks.items():
            chosen = random.Random(f"{seed}:{name}").sample(list(task.train), min(samples, len(task.train)))
            self.batches[name] = pretokenize(tokenizer, chosen, max_len, batch_size)

    @property
    def params(self) -> dict[str, Any]:
        out = {"align": self.mode, "align_samples": self.samples}
        out.update({"align_ridge": self.ridge} if self.mode == "ridge" else {"align_steps": self.steps, "align_lr": self.lr})
        return out

    @torch.no_grad()  # not inference_mode: the Adam route differentiates through the outputs' consumers
    def features(self, state: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        """Pooled sentence features of ``state`` on the task's alignment inputs (N × d)."""
        load_weights(self.model, state)
        return torch.cat([embed(self.model, b.input_ids, b.attention_mask) for b in self.batches[task]])

    @torch.no_grad()  # not inference_mode: the Adam route differentiates through the outputs' consumers
    def normalized_means(self, state: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        """u: the masked token mean of the final LayerNorm's normalised input, before γ and β (N × d)."""
        load_weights(self.model, state)
        captured: list[torch.Tensor] = []
        eps = self.norm_module.eps
        hook = self.norm_module.register_forward_hook(
            lambda module, args, out: captured.append(F.layer_norm(args[0], module.normalized_shape, eps=eps)))
        try:
            out = []
            for b in self.batches[task]:
                captured.clear()
                self.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                out.append(mean_pool(captured[-1], b.attention_mask))
        finally:
            hook.remove()
        return torch.cat(out)

    def fit(self, u: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor,
            beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "ridge":
            return ridge_diagonal(u, target, gamma, beta, ridge=self.ridge)
        return gradient_align(u, target, gamma, beta, diagonal=True, lr=self.lr, steps=self.steps)

    def __call__(self, merger, t: int, task: str, previous: Mapping[str, torch.Tensor] | None) -> dict | None:
        if previous is None:
            return None
        target = self.features(previous, task)
        merged = merger.state_dict()
        u = self.normalized_means(merged, task)
        w_name, b_name = f"{self.norm}.weight", f"{self.norm}.bias"
        gamma, beta = merged[w_name], merged[b_name]
        before = feature_discrepancy(u * gamma + beta, target)
        new_gamma, new_beta = self.fit(u, target, gamma, beta)
        after = feature_discrepancy(u * new_gamma + new_beta, target)
        applied = after < before  # the Adam route can overshoot: never make the features worse
        if applied:
            merger.override({w_name: new_gamma, b_name: new_beta})
        return {"discrepancy_before": before, "discrepancy_after": after, "applied": applied}

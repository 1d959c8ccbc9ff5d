"""Fine-tuning one task's expert: the encoder learns, the zero-shot head stays frozen.

This mirrors the OPCM paper's Appendix B: cross-entropy on ``scale · cos(embedding, head
row)`` with the head computed once from the pre-trained encoder (:mod:`heads`); AdamW
with linear warm-up then cosine decay to zero; batches drawn from a seeded shuffle of
the training split. The defaults (lr 1e-4, 120 steps of 32 texts, 48 tokens) are the
smallest budget that gives MiniLM a clear gain over zero-shot on the suite's tasks;
weight decay is 0, as in the paper's plain Adam.

The forward pass is a swappable function ``(input_ids, attention_mask) -> features``:

* :func:`plain_forward` runs the encoder (in train mode, so with its dropout);
* :func:`linearized_forward` runs its first-order Taylor expansion around an anchor θ0,
  ``f(x; θ0) + J_θ f(x; θ0)(θ − θ0)`` (one JVP per forward, dropout off), the tangent-space
  fine-tuning of the holistic method (docs/methods.md, "The holistic pipeline").

After training, AdamW's raw second moments (``exp_avg_sq``, no bias correction) are
returned by parameter name: the optimizer-state Fisher of the holistic method.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmerge.engine import model_device, seeded_on
from cmerge.suites.backbone import embed, mean_pool, tokenize
from cmerge.suites.heads import LOGIT_SCALE, cosine_logits

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every hyper-parameter that changes an expert. Its fields key the expert cache."""

    lr: float = 1e-4
    steps: int = 120
    batch_size: int = 32
    max_len: int = 48
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    grad_clip: float = 1.0
    logit_scale: float = LOGIT_SCALE
    seed: int = 0
    linearized: bool = False

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "steps": self.steps, "batch_size": self.batch_size,
                    "max_len": self.max_len, "logit_scale": self.logit_scale}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"FinetuneRecipe.{name} must be positive, got {value!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("FinetuneRecipe.weight_decay, grad_clip and warmup_steps must be >= 0 "
                             f"(got {self.weight_decay!r}, {self.grad_clip!r}, {self.warmup_steps!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FinetuneRecipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class FinetuneResult:
    """What training leaves besides the updated weights (which stay in the model)."""

    exp_avg_sq: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    adam_beta2: float = 0.999

    @property
    def adam_metadata(self) -> dict[str, str]:
        """What Adam's bias correction of ``exp_avg_sq`` needs: the step count and β2."""
        return {"adam_step": str(len(self.losses)), "adam_beta2": repr(self.adam_beta2)}

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))


def plain_forward(model: torch.nn.Module) -> Forward:
    """The encoder itself: mean-pooled features of the current weights."""
    return lambda input_ids, attention_mask: embed(model, input_ids, attention_mask)


def linearized_forward(model: torch.nn.Module, anchor: Mapping[str, torch.Tensor]) -> Forward:
    """The encoder linearised at ``anchor`` (θ0): ``f(x; θ0) + J f(x; θ0) · (θ − θ0)``.

    θ is the model's current parameters (what the optimizer updates); ``anchor`` holds
    θ0 for every parameter name. Attention runs on PyTorch's math kernel, the one with
    forward-mode derivatives.
    """
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in anchor]
    if missing:
        raise ValueError(f"the linearisation anchor lacks parameter {missing[0]!r}; give the base state dict")
    device = model_device(model)
    theta0 = tuple(anchor[n].detach().to(device, torch.float32) for n in names)
    buffers = dict(model.named_buffers())

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        def features(*params: torch.Tensor) -> torch.Tensor:
            state = {**dict(zip(names, params)), **buffers}
            return functional_call(model, state, args=(), kwargs={
                "input_ids": input_ids, "attention_mask": attention_mask}).last_hidden_state

        current = dict(model.named_parameters())
        delta = tuple(current[n] - t0 for n, t0 in zip(names, theta0))
        with sdpa_kernel(SDPBackend.MATH):
            value, tangent = jvp(features, theta0, delta)
        return mean_pool(value + tangent, attention_mask)

    return forward


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, params, grad_clip: float) -> float:
    """One training step from ``loss``: gradients, clipping to ``grad_clip`` (0: none), the optimizer and the
    schedule; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``n`` examples: a fresh shuffle each epoch, no partial batches
    unless ``n < batch_size``."""
    size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield perm[start:start + size]


def finetune(
    model: torch.nn.Module,
    tokenizer,
    train: list[tuple[str, int]],
    head: torch.Tensor,
    recipe: FinetuneRecipe,
    *,
    anchor: Mapping[str, torch.Tensor] | None = None,
    progress: bool | str = False,
) -> FinetuneResult:
    """Train ``model`` in place on ``train`` (text, label) pairs against the frozen ``head``.

    ``anchor`` is θ0 for a linearised recipe (required then, refused otherwise).
    ``progress`` shows a bar (a string names it). The model is left in eval mode.
    Training runs on the device the model is on (the batches and the head are moved
    there); the seeded shuffle and the returned second moments stay on the CPU.
    """
    if not train:
        raise ValueError("fine-tuning needs at least one training example")
    if recipe.linearized != (anchor is not None):
        raise ValueError("a linearized recipe needs the anchor (the base state dict), and only it does")
    forward = linearized_forward(model, anchor) if recipe.linearized else plain_forward(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    device = model_device(model)
    texts = [t for t, _ in train]
    labels = torch.tensor([y for _, y in train], device=device)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=recipe.steps, desc=progress if isinstance(progress, str) else "fine-tune",
               disable=not progress, leave=False)
    with seeded_on(device, recipe.seed):
        model.train(not recipe.linearized)
        for idx in batch_indices(len(texts), recipe.batch_size, generator):
            batch = tokenize(tokenizer, [texts[i] for i in idx.tolist()], recipe.max_len)
            logits = cosine_logits(forward(batch["input_ids"], batch["attention_mask"]), head, recipe.logit_scale)
            loss = F.cross_entropy(logits, labels[idx.to(device)])
            losses.append(optimizer_step(loss, optimizer, scheduler, params, recipe.grad_clip))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) == recipe.steps:
                break
    bar.close()
    model.eval()
    return FinetuneResult(second_moments(model, optimizer), losses, time.perf_counter() - start,
                          adam_beta2=optimizer.param_groups[0]["betas"][1])


def second_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's raw ``exp_avg_sq`` for every parameter name, on the CPU; zeros where no gradient ever
    came (e.g. BERT's pooler, unused by mean pooling)."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        moment = state["exp_avg_sq"].detach() if "exp_avg_sq" in state else torch.zeros_like(p)
        out[name] = moment.to("cpu", copy=True)
    return out

"""LoRA on the LLM suite: the recipe, training with peft and AdamW, and ΔW = s · B A.

The seeds' recipe (docs/llm_suite.md, "Experts and trained rows"): rank 8 on ``q_proj`` and ``v_proj``, AdamW, the
loss being the answer tokens' negative log-likelihood after the instruction prompt
(:func:`scoring.answer_nll`, the shared prefix computed once per batch). LoRA dropout
is 0, so an adapter is a deterministic function of its recipe, data and start.

Each batch is drawn from one task (a seeded shuffle per task, as in the text suite);
with several tasks (the multi-task adapter) the tasks take turns in a seeded order, so
each task gets the same number of batches.

An adapter's tensors are named as peft saves them
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, r × in, and
``...lora_B.weight``, out × r). The model weight it moves is
``model.layers.0.self_attn.q_proj.weight`` by ΔW = (lora_alpha / r) · B A
(:func:`delta_weights`; the tests check it against peft's ``merge_and_unload``).
After training, AdamW's raw second moments (``exp_avg_sq``, no bias correction) are
returned under the same names.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from cmerge.engine import model_device, seeded_on
from cmerge.suites.finetune import SCHEDULES, FinetuneRecipe, batch_indices, optimizer_step
from cmerge.suites.llm.scoring import answer_nll
from cmerge.suites.llm.tasks import Prompts

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
FACTORS = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraRecipe:
    """Every hyper-parameter of LoRA training. Its fields key the adapter cache."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 2e-3
    steps: int = 60
    batch_size: int = 8
    warmup_steps: int = 5
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoraRecipe.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or not self.alpha > 0:
            raise ValueError(f"LoraRecipe.lr and alpha must be positive, got {self.lr!r} and {self.alpha!r}")
        if self.schedule not in SCHEDULES or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"LoraRecipe: schedule must be one of {SCHEDULES} and warmup_steps, weight_decay, "
                             f"grad_clip >= 0 (got {self.schedule!r}, {self.warmup_steps!r}, {self.weight_decay!r}, "
                             f"{self.grad_clip!r})")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r (peft's default, no rsLoRA)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant or cosine: the text suite's schedule (``FinetuneRecipe.lr_factor``)."""
        return FinetuneRecipe.lr_factor(self, step)  # type: ignore[arg-type]  # reads steps, warmup_steps, schedule


def lora_config(recipe: LoraRecipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def weight_name(adapter_name: str) -> str:
    """``base_model.model.X.lora_A.weight`` → ``X.weight``: the model weight an adapter tensor moves."""
    for suffix in FACTORS:
        if adapter_name.startswith(PEFT_PREFIX) and adapter_name.endswith(suffix):
            return adapter_name[len(PEFT_PREFIX):-len(suffix)] + ".weight"
    raise ValueError(f"{adapter_name!r} is not a LoRA factor of a peft adapter")


def factor_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Model weight name → (A, B) of every adapted module in an adapter state."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        pairs.setdefault(weight_name(name), {})[name.rsplit(".", 2)[-2]] = t
    missing = [w for w, p in pairs.items() if set(p) != {"lora_A", "lora_B"}]
    if missing:
        raise ValueError(f"the adapter has only one factor for {missing[0]!r}")
    return {w: (p["lora_A"], p["lora_B"]) for w, p in sorted(pairs.items())}


def delta_weights(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """ΔW = s · B A per adapted model weight."""
    return {w: scaling * (b.float() @ a.float()) for w, (a, b) in factor_pairs(state).items()}


def merged_weights(base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                   scaling: float) -> dict[str, torch.Tensor]:
    """θ0 + ΔW for every adapted weight (``base`` holds θ0 of at least those weights)."""
    return {w: base[w].float() + d.to(base[w].device) for w, d in delta_weights(state, scaling).items()}


def adapted_weights(lm: torch.nn.Module, recipe: LoraRecipe) -> dict[str, torch.Tensor]:
    """θ0 of every weight the recipe adapts, by model parameter name (CPU copies)."""
    leaves = {f".{t}.weight" for t in recipe.targets}
    return {n: p.detach().cpu().clone() for n, p in lm.named_parameters() if any(n.endswith(s) for s in leaves)}


@dataclass
class TrainResult:
    """One training run: the adapter's final tensors, AdamW's second moments, and the log."""

    state: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    adam_beta2: float = 0.999

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))

    @property
    def adam_metadata(self) -> dict[str, str]:
        return {"adam_step": str(len(self.losses)), "adam_beta2": repr(self.adam_beta2)}


def task_batches(prompts: Sequence[Prompts], batch_size: int, seed: int) -> Iterator[tuple[Prompts, list[int]]]:
    """Endless (task prompts, example indices) batches: one task per batch, tasks in seeded turns."""
    generator = torch.Generator().manual_seed(seed)
    per_task = [batch_indices(len(p), batch_size, generator) for p in prompts]
    while True:
        for t in torch.randperm(len(prompts), generator=generator).tolist():
            yield prompts[t], next(per_task[t]).tolist()


class LoraTrainer:
    """A peft-wrapped copy of the backbone whose adapter is re-initialised or loaded for each run."""

    def __init__(self, lm: torch.nn.Module, recipe: LoraRecipe) -> None:
        from peft import get_peft_model

        self.recipe = recipe
        self.model = get_peft_model(copy.deepcopy(lm), lora_config(recipe))
        self.trainable = {self._key(n): p for n, p in self.model.named_parameters() if p.requires_grad}

    @staticmethod
    def _key(param_name: str) -> str:
        return param_name.replace(f".{ADAPTER}.", ".")

    @property
    def lm(self) -> torch.nn.Module:
        """The causal LM with the LoRA layers injected (what :mod:`scoring` runs)."""
        return self.model.get_base_model()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trainable.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.trainable):
            extra = sorted(set(state) ^ set(self.trainable))
            raise ValueError(f"adapter state does not match the trainer's LoRA tensors (first difference {extra[0]!r})")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state[n])

    def reset(self, seed: int) -> None:
        """peft's initialisation (A Kaiming-uniform, B = 0), from a seeded generator."""
        from peft.tuners.lora import LoraLayer

        with seeded_on(model_device(self.model), seed):
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.reset_lora_parameters(ADAPTER, True)

    def train(self, prompts: Sequence[Prompts], *, steps: int | None = None,
              start: Mapping[str, torch.Tensor] | None = None, progress: bool | str = False) -> TrainResult:
        """Train the adapter on ``prompts`` (one or more tasks) from ``start`` (default: a fresh init)."""
        recipe = self.recipe
        steps = steps or recipe.steps
        if start is None:
            self.reset(recipe.seed)
        else:
            self.load(start)
        params = list(self.trainable.values())
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, replace(recipe, steps=steps).lr_factor)
        batches = task_batches(prompts, recipe.batch_size, recipe.seed)
        losses: list[float] = []
        bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else "LoRA", disable=not progress,
                   leave=False)
        started = time.perf_counter()
        self.model.train()
        for _ in range(steps):
            task, indices = next(batches)
            loss = answer_nll(self.lm, task, indices)
            losses.append(optimizer_step(loss, optimizer, scheduler, params, recipe.grad_clip))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        self.model.eval()
        moments = {n: optimizer.state[p]["exp_avg_sq"].detach().cpu().clone() for n, p in self.trainable.items()}
        return TrainResult(self.state(), moments, losses, time.perf_counter() - started,
                           adam_beta2=optimizer.param_groups[0]["betas"][1])

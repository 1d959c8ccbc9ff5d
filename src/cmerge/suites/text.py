"""The text suite's evaluator: accuracy and loss of an encoder state dict on one split of each task.

A model is scored exactly as its experts were trained: mean-pooled MiniLM features
against the task's frozen zero-shot head (:mod:`heads`), so the pre-trained backbone gets
its zero-shot accuracy and each expert its fine-tuned one. The benchmark reports the
``test`` split and chooses a method's knobs on the ``validation`` split (one evaluator
each). The evaluator is called once per task per merging step per order per method
(thousands of times in a benchmark), so the work that does not depend on the model is
done once at construction: heads, and the texts tokenised, sorted by length and cut
into padded batches.

Where time goes (docs/text_suite.md): nearly all of it is the encoder's matrix products,
so the one lever that keeps every number the same is doing the tasks of one call side
by side: ``workers`` > 1 scores them on that many threads, each running its operations
on one core. A batch's arithmetic does not depend on which thread runs it, so the
results are identical to ``workers=1``.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from cmerge.engine import model_device
from cmerge.errors import CmergeError
from cmerge.evaluation.protocol import TaskResult
from cmerge.suites.backbone import embed, load_weights
from cmerge.suites.heads import LOGIT_SCALE, cosine_logits, zero_shot_head
from cmerge.suites.text_data import SPLITS, TextTask


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def pretokenize(tokenizer, examples: Sequence[tuple[str, int]], max_len: int, batch_size: int,
                device: torch.device | str = "cpu") -> list[Batch]:
    """``examples`` as padded batches of similar lengths (each padded only to its own longest text), on
    ``device``."""
    ids = tokenizer([t for t, _ in examples], truncation=True, max_length=max_len)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        labels = torch.tensor([examples[i][1] for i in chunk])
        batches.append(Batch(input_ids.to(device), mask.to(device), labels.to(device)))
    return batches


class TextSuiteEvaluator:
    """Scores encoder state dicts on one split of the text suite's tasks (the ``Evaluator`` protocol).

    ``backbone`` must hold the pre-trained weights when the evaluator is built: the heads
    come from it. The evaluator keeps its own copy of the module and loads each scored
    state dict into it strictly (BERT's derived ``position_ids`` buffer may be present or
    not). ``split`` is ``"test"`` (what the benchmark reports) or ``"validation"`` (what its
    sweeps choose on). ``num_threads`` sets torch's global intra-op thread count; None (the
    default) leaves torch's own choice. ``workers`` > 1 scores the tasks of one call on that
    many threads of one core each (see the module docstring); the results do not change.
    ``device`` is where the copy runs (``"cuda"``: scoring on a GPU, the same numbers up to
    the last digits of float32 sums).
    """

    def __init__(
        self, backbone: torch.nn.Module, tokenizer, tasks: Mapping[str, TextTask], *, split: str = "test",
        max_len: int = 48, batch_size: int = 64, logit_scale: float = LOGIT_SCALE, num_threads: int | None = None,
        workers: int = 1, device: str | torch.device = "cpu",
    ) -> None:
        if split not in SPLITS[1:]:
            raise CmergeError(f"the text suite scores the validation or the test split, not {split!r}.")
        if workers < 1:
            raise CmergeError(f"the evaluator needs at least one worker, got {workers}.")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.split = split
        self.max_len = max_len
        self.batch_size = batch_size
        self.logit_scale = logit_scale
        self.workers = workers
        self.model = copy.deepcopy(backbone).to(device).eval()
        self.heads = {name: zero_shot_head(self.model, tokenizer, task.descriptions, max_len)
                      for name, task in tasks.items()}
        self.batches = {name: pretokenize(tokenizer, task.split(split), max_len, batch_size, model_device(self.model))
                        for name, task in tasks.items()}
        self.task_evaluations = 0
        self.seconds = 0.0

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def evaluate(self, model: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, TaskResult]:
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise CmergeError(f"the text suite has no task {unknown[0]!r}; it has {', '.join(self.heads)}.")
        start = time.perf_counter()
        load_weights(self.model, model)
        if self.workers > 1 and len(tasks) > 1:
            results = self._score_side_by_side(list(tasks))
        else:
            results = {name: self.score(name) for name in tasks}
        self.seconds += time.perf_counter() - start
        self.task_evaluations += len(tasks)
        return results

    def _score_side_by_side(self, tasks: list[str]) -> dict[str, TaskResult]:
        """Every task on its own thread (at most ``workers`` at once), each thread on one core.

        Longest tasks first, so the threads finish together; torch's intra-op thread
        count is 1 meanwhile and restored afterwards.
        """
        by_cost = sorted(tasks, key=lambda t: -sum(b.input_ids.numel() for b in self.batches[t]))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(self.workers, len(tasks))) as pool:
                scored = dict(zip(by_cost, pool.map(self.score, by_cost)))
        finally:
            torch.set_num_threads(threads)
        return {name: scored[name] for name in tasks}

    @torch.inference_mode()
    def score(self, task: str) -> TaskResult:
        """Accuracy and mean cross-entropy of the currently loaded weights on ``task``'s split."""
        head = self.heads[task]
        correct, loss, n = 0, 0.0, 0
        for b in self.batches[task]:
            logits = cosine_logits(embed(self.model, b.input_ids, b.attention_mask), head, self.logit_scale)
            loss += F.cross_entropy(logits, b.labels, reduction="sum").item()
            correct += (logits.argmax(-1) == b.labels).sum().item()
            n += len(b.labels)
        return TaskResult(accuracy=correct / n, loss=loss / n)

    @property
    def seconds_per_task(self) -> float:
        """Mean wall time of one task evaluation so far (weight loading included)."""
        return self.seconds / max(1, self.task_evaluations)

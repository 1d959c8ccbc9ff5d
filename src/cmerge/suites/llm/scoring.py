"""Label log-likelihood ranking with a shared prefix and reused key/value caches.

A task's prediction for an example is the label whose tokens are most likely after the
prompt: score_k = Σ_j log p(answer_k[j] | prompt, answer_k[:j]), the sum over the
label's tokens, argmax over k. Done naively that is one forward pass over
prefix + input + answer per example and label. Here it is, exactly:

1. the task's shared prefix once (its key/value cache, one row);
2. a batch of examples after it, one row each: the input, then every label of two or more
   tokens (but its last token) packed side by side in the same row. A 4-D attention mask
   lets the input attend causally to prefix + input, and each label segment to prefix +
   input + its own earlier tokens only; position ids continue the input in every segment.
   The input's last position gives every label's first token, each segment the rest.

Causal attention makes the prefix's cached keys and values the same as in the naive
pass, and the mask and positions put every token where it sits in the naive sequence
prefix + input + label (the tests check equality with the naive scoring). The
vocabulary projection is applied only at the positions that are read.

Training (:mod:`lora`) uses the same :func:`packed_forward` for its loss, :func:`answer_nll`.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from cmerge.engine import model_device
from cmerge.errors import CmergeError
from cmerge.evaluation.protocol import TaskResult
from cmerge.suites.llm.tasks import Prompts

Past = list[tuple[torch.Tensor, torch.Tensor]]
Row = tuple[Sequence[int], Sequence[Sequence[int]]]   # (input tokens, segments fed after it)


def run_prefix(lm: torch.nn.Module, prefix: Sequence[int]) -> Past:
    """The keys and values of ``prefix`` (one row), to be shared by every example of the task."""
    from transformers import DynamicCache

    cache = DynamicCache()
    lm.model(input_ids=torch.tensor([list(prefix)], device=model_device(lm)), cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def packed_forward(lm: torch.nn.Module, past: Past, rows: Sequence[Row]) -> torch.Tensor:
    """Hidden states (B × W × d) of ``rows`` after the shared ``past`` (one row, P positions).

    A row is an input followed by segments packed side by side: the input is causal after
    the prefix; each segment sees the prefix, the whole input and its own earlier tokens,
    never another segment, and its positions continue the input's. So segment k of a row
    is computed exactly as if it alone followed prefix + input (one 4-D mask, no cache
    copies). Padding positions see only the prefix.
    """
    from transformers import DynamicCache

    device = model_device(lm)
    p = past[0][0].shape[-2]
    width = max(len(inp) + sum(len(s) for s in segs) for inp, segs in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, p + width), dtype=torch.bool)
    mask[..., :p] = True
    for b, (inp, segs) in enumerate(rows):
        n = len(inp)
        ids[b, :n] = torch.tensor(inp, dtype=torch.long)
        positions[b, :n] = torch.arange(p, p + n)
        mask[b, 0, :n, p:p + n] = torch.ones((n, n), dtype=torch.bool).tril()
        start = n
        for seg in segs:
            m = len(seg)
            ids[b, start:start + m] = torch.tensor(seg, dtype=torch.long)
            positions[b, start:start + m] = torch.arange(p + n, p + n + m)
            mask[b, 0, start:start + m, p:p + n] = True
            mask[b, 0, start:start + m, p + start:p + start + m] = torch.ones((m, m), dtype=torch.bool).tril()
            start += m
    cache = DynamicCache(ddp_cache_data=[(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                         for k, v in past])
    out = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   cache=cache, use_cache=True)
    return out.last_hidden_state


def _answer_positions(inp: Sequence[int], answers: Sequence[Sequence[int]]) -> list[list[int]]:
    """Where each answer token is predicted in a packed row of (inp, [a[:-1] for a in answers])."""
    out, start = [], len(inp)
    for a in answers:
        out.append([len(inp) - 1] + list(range(start, start + len(a) - 1)))
        start += len(a) - 1
    return out


def _token_logprobs(lm: torch.nn.Module, hidden: torch.Tensor, rows: list[int], cols: list[int],
                    targets: list[int]) -> torch.Tensor:
    dev = hidden.device
    logits = lm.lm_head(hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).double()
    return F.log_softmax(logits, dim=-1)[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)]


def label_logprobs(lm: torch.nn.Module, prompts: Prompts, batch_size: int = 16) -> torch.Tensor:
    """N × K: the log-likelihood of each label's tokens after each example's prompt (float64, CPU)."""
    n, answers = len(prompts), prompts.answers
    scores = torch.zeros((n, len(answers)), dtype=torch.float64)
    if n == 0:
        return scores
    with torch.inference_mode():
        past = run_prefix(lm, prompts.prefix)
        order = sorted(range(n), key=lambda i: len(prompts.inputs[i]))
        for start in range(0, n, batch_size):
            chunk = order[start:start + batch_size]
            rows = [(prompts.inputs[i], [a[:-1] for a in answers if len(a) > 1]) for i in chunk]
            hidden = packed_forward(lm, past, rows)
            sel_row, sel_col, targets, owner = [], [], [], []
            for b, i in enumerate(chunk):
                inp = prompts.inputs[i]
                multi = iter(_answer_positions(inp, [a for a in answers if len(a) > 1]))
                for k, a in enumerate(answers):
                    cols = next(multi) if len(a) > 1 else [len(inp) - 1]
                    sel_row += [b] * len(a)
                    sel_col += cols
                    targets += list(a)
                    owner += [(i, k)] * len(a)
            values = _token_logprobs(lm, hidden, sel_row, sel_col, targets).cpu()
            for (i, k), v in zip(owner, values.tolist()):
                scores[i, k] += v
    return scores


def answer_nll(lm: torch.nn.Module, prompts: Prompts, indices: Sequence[int]) -> torch.Tensor:
    """Mean negative log-likelihood of the correct answers' tokens of ``indices`` (the training loss).

    The prefix is run once and its keys and values shared by the batch (gradients flow through them).
    """
    past = run_prefix(lm, prompts.prefix)
    rows, sel_row, sel_col, targets = [], [], [], []
    for b, i in enumerate(indices):
        inp, answer = prompts.inputs[i], prompts.answers[prompts.labels[i]]
        rows.append((inp, [answer[:-1]] if len(answer) > 1 else []))
        sel_row += [b] * len(answer)
        sel_col += _answer_positions(inp, [answer])[0]
        targets += list(answer)
    hidden = packed_forward(lm, past, rows)
    dev = hidden.device
    logits = lm.lm_head(hidden[torch.tensor(sel_row, device=dev), torch.tensor(sel_col, device=dev)])
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=dev))


class LLMEvaluator:
    """Scores the adapted weights of a causal LM on each task's prompts (the ``Evaluator`` protocol).

    ``evaluate(weights, tasks)`` copies ``weights`` (a mapping over the model's own
    parameter names, e.g. every q_proj / v_proj weight) into the model, the rest staying
    θ0, ranks the labels of every example and returns accuracy and the cross-entropy of
    the label distribution (softmax over the labels' log-likelihoods).
    """

    def __init__(self, lm: torch.nn.Module, prompts: Mapping[str, Prompts], *, batch_size: int = 16) -> None:
        self.lm = lm.eval()
        self.prompts = dict(prompts)
        self.batch_size = batch_size
        self.params = dict(lm.named_parameters())
        self._original: dict[str, torch.Tensor] = {}
        self.task_evaluations = 0
        self.seconds = 0.0

    @property
    def tasks(self) -> list[str]:
        return list(self.prompts)

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Put ``weights`` into the model; every tensor an earlier call replaced and this one does not gets θ0 back."""
        unknown = [n for n in weights if n not in self.params]
        if unknown:
            raise CmergeError(f"the model has no parameter {unknown[0]!r}.")
        with torch.no_grad():
            for name, value in weights.items():
                if name not in self._original:
                    self._original[name] = self.params[name].detach().clone()
                self.params[name].copy_(value)
            for name, value in self._original.items():
                if name not in weights:
                    self.params[name].copy_(value)

    def evaluate(self, weights: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, TaskResult]:
        unknown = [t for t in tasks if t not in self.prompts]
        if unknown:
            raise CmergeError(f"the LLM suite has no task {unknown[0]!r} here; it has {', '.join(self.prompts)}.")
        start = time.perf_counter()
        self.load(weights)
        results = {task: self.score(task) for task in tasks}
        self.seconds += time.perf_counter() - start
        self.task_evaluations += len(tasks)
        return results

    def score(self, task: str) -> TaskResult:
        """Accuracy and label cross-entropy of the currently loaded weights on ``task``."""
        prompts = self.prompts[task]
        scores = label_logprobs(self.lm, prompts, self.batch_size)
        labels = torch.tensor(prompts.labels)
        loss = F.cross_entropy(scores, labels).item()
        return TaskResult(accuracy=(scores.argmax(1) == labels).double().mean().item(), loss=loss)

    @property
    def seconds_per_task(self) -> float:
        return self.seconds / max(1, self.task_evaluations)

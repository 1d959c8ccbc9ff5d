"""The LLM suite's tasks: the text suite's classification tasks, asked as instructions.

Each task of :mod:`cmerge.suites.text_data` becomes a chat turn for an instruction LM::

    <|im_start|>system ... <|im_end|>            (the chat template's default system turn)
    <|im_start|>user
    Which topic is this quote about? Answer with one of: computers, education, ...
    Quote: <the text><|im_end|>
    <|im_start|>assistant
    <the label>

The question and the list of labels come *before* the text, so everything up to
``Quote:`` is one **shared prefix** per task: scoring and training compute it once
and reuse its key/value cache for every example (:mod:`scoring`), which makes an
example cost only its own ~20-50 tokens. A sequence is, by definition, the
concatenation of separately tokenised pieces: prefix + `` <text>`` (cut to
``max_text_tokens``) + end-of-turn and assistant header + the label's tokens. Training
and scoring use exactly these tokens, so there is no boundary ambiguity.

Settings (docs/llm_suite.md, "Tasks and prompts"). **standard**: four tasks standing in for O-LoRA's
AG News / Amazon / DBpedia / Yahoo Answers, in O-LoRA's three fixed orders of its
standard benchmark (``scripts/order_{1,2,3}.sh`` of its repository)::

    order 1: dbpedia → amazon → yahoo → agnews
    order 2: dbpedia → amazon → agnews → yahoo
    order 3: yahoo → amazon → agnews → dbpedia

* AG News (news text → World / Sports / Business / Sci-Tech) ↦ ``wordnet_domain``:
  expository text → its subject field (law, military, chemistry, computing, physics,
  music, baseball, medicine, …), topic classification over formal prose.
* Amazon reviews (review → rating) ↦ ``food_sentiment``: Amazon fine-food reviews →
  five stars or not; the same source and the same kind of task.
* DBpedia (encyclopedic abstract of an entity → its ontology class: animal, plant,
  artist, building, …) ↦ ``wordnet_noun``: dictionary definition of a noun → its
  semantic class (animal, plant, person, artifact, location, food, …).
* Yahoo Answers (informal user text → 10 topics: health, sports, computers, education,
  politics, science, family & relationships, …) ↦ ``fortune_topic``: user-contributed
  quotes and jokes → computers, education, medicine, sports, politics, science, love,
  kids, …; the closest label set of all our tasks to Yahoo's.

**long**: those four plus four tasks of other kinds (language identification, emoji
names, authorship of Austen passages, part of speech of single words), eight tasks over
seeded shuffled orders.

Splits: test = the task's test split cut to ``n_test`` examples (shuffled and stratified
already); validation = the task's own validation split when it has one
(``task.validation``), else the last ``n_validation`` training examples, which are then
not trained on. Selection (sweeps) uses validation, the tables use test.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from cmerge.errors import CmergeError
from cmerge.suites.text_data import TextTask

PROMPT_VERSION = 1
"""Bump when the prompt wording or assembly changes (it keys every cached adapter)."""

# text-suite task → (question, name of the input)
INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "wordnet_domain": ("Which field does the term defined here belong to?", "Definition"),
    "food_sentiment": ("Is this food review a five-star rave (great) or not (other)?", "Review"),
    "wordnet_noun": ("Which category does the word defined here belong to?", "Definition"),
    "fortune_topic": ("Which topic is this quote about?", "Quote"),
    "fortune_lang": ("Which language is this sentence in?", "Sentence"),
    "emoji_group": ("Which group does this emoji belong to?", "Emoji name"),
    "austen_novel": ("Which Jane Austen novel is this passage from?", "Passage"),
    "word_pos": ("Which part of speech is this word?", "Word"),
    "wordnet_verb": ("Which category does the verb defined here belong to?", "Definition"),
    "fortune_collection": ("Which collection is this quote from?", "Quote"),
}

OLORA_STANDARD = {"dbpedia": "wordnet_noun", "amazon": "food_sentiment", "agnews": "wordnet_domain",
                  "yahoo": "fortune_topic"}
OLORA_ORDERS = (("dbpedia", "amazon", "yahoo", "agnews"),
                ("dbpedia", "amazon", "agnews", "yahoo"),
                ("yahoo", "amazon", "agnews", "dbpedia"))
STANDARD_TASKS: tuple[str, ...] = ("wordnet_noun", "food_sentiment", "wordnet_domain", "fortune_topic")
STANDARD_ORDERS: tuple[tuple[str, ...], ...] = tuple(tuple(OLORA_STANDARD[t] for t in o) for o in OLORA_ORDERS)
LONG_TASKS: tuple[str, ...] = STANDARD_TASKS + ("fortune_lang", "emoji_group", "austen_novel", "word_pos")
SETTINGS = {"standard": STANDARD_TASKS, "long": LONG_TASKS}

_SLOT = "\x00TEXT\x00"


@dataclass(frozen=True)
class Splits:
    """The examples each use of a task reads: (text, label index) pairs."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]


def task_splits(task: TextTask, n_test: int = 200, n_validation: int = 100) -> Splits:
    """Train / validation / test of ``task`` (see the module docstring)."""
    validation = getattr(task, "validation", None)
    train = list(task.train)
    if not validation:
        if len(train) <= n_validation:
            raise CmergeError(f"task {task.name!r} has {len(train)} training examples, too few to hold out "
                              f"{n_validation} for validation.")
        train, validation = train[:-n_validation], train[-n_validation:]
    return Splits(train=train, validation=list(validation)[:n_validation], test=list(task.test)[:n_test])


@dataclass(frozen=True)
class Prompts:
    """One task's examples as token ids: the shared prefix, each example's own tokens, the answers."""

    task: str
    prefix: tuple[int, ...]                # chat turns up to the text: the same for every example
    inputs: tuple[tuple[int, ...], ...]    # per example: " <text>" + end of turn + assistant header
    answers: tuple[tuple[int, ...], ...]   # per class: the label's tokens
    labels: tuple[int, ...]                # per example: the class index

    def __len__(self) -> int:
        return len(self.inputs)

    def fingerprint(self) -> str:
        """sha256 over every token the model sees and every label: what keys a cached adapter."""
        payload = [self.task, self.prefix, self.inputs, self.answers, self.labels]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def user_message(task_name: str, labels: Sequence[str]) -> str:
    """The user turn of ``task_name`` with the text slot marked (the slot is where `` <text>`` goes)."""
    if task_name not in INSTRUCTIONS:
        raise CmergeError(f"the LLM suite has no instruction for task {task_name!r}; add one to "
                          f"cmerge.suites.llm.tasks.INSTRUCTIONS.")
    question, field = INSTRUCTIONS[task_name]
    return f"{question} Answer with one of: {', '.join(labels)}.\n{field}:{_SLOT}"


def template_parts(tokenizer, task_name: str, labels: Sequence[str]) -> tuple[str, str]:
    """The chat-templated conversation split at the text: (prefix, suffix), suffix ending the assistant header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(task_name, labels)}],
                                         tokenize=False, add_generation_prompt=True)
    if text.count(_SLOT) != 1:
        raise CmergeError("the tokenizer's chat template altered the user message; cannot place the text.")
    prefix, suffix = text.split(_SLOT)
    return prefix, suffix


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer, task_name: str, labels: Sequence[str], examples: Sequence[tuple[str, int]],
           max_text_tokens: int = 48) -> Prompts:
    """``examples`` of one task as :class:`Prompts`; refuses label sets that ranking cannot tell apart.

    A label whose tokens begin another label's tokens would win or lose by the missing
    end of the answer, so such label sets are refused (none of the suite's are).
    """
    if max_text_tokens < 1:
        raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
    prefix, suffix = template_parts(tokenizer, task_name, labels)
    end = _ids(tokenizer, suffix)
    answers = tuple(_ids(tokenizer, label) for label in labels)
    for i, a in enumerate(answers):
        if not a:
            raise CmergeError(f"task {task_name!r}: label {labels[i]!r} has no tokens.")
        for j, b in enumerate(answers):
            if i != j and b[:len(a)] == a:
                raise CmergeError(f"task {task_name!r}: the tokens of label {labels[i]!r} begin those of "
                                  f"{labels[j]!r}, so label log-likelihoods cannot rank them fairly.")
    inputs = tuple(_ids(tokenizer, " " + text)[:max_text_tokens] + end for text, _ in examples)
    return Prompts(task_name, _ids(tokenizer, prefix), inputs, answers, tuple(int(y) for _, y in examples))


def check_setting(setting: str) -> tuple[str, ...]:
    """The task names of ``setting`` (standard or long)."""
    if setting not in SETTINGS:
        raise CmergeError(f"unknown LLM setting {setting!r}; choose one of {', '.join(SETTINGS)}.")
    return SETTINGS[setting]

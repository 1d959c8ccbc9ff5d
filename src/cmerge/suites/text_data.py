"""The tasks of the offline text suite, built from installed Debian packages and cached.

Every task is a short-text classification problem whose labeled data ship inside a
Debian package (WordNet, the fortune databases, Unicode's emoji list, three CRAN data
packages). Nothing comes from a model or data hub. A task is described once, by a
:class:`TaskRecipe`: the packages it reads, the function that files raw texts under
class keys (in :mod:`cmerge.suites.sources`), its class table with one human-readable
description per class, and a seed. :func:`build_task` turns a recipe into a
:class:`TextTask`:

1. clean every text (control characters out, whitespace collapsed, cut at a word
   boundary after ``max_chars`` characters: the backbone reads 48 tokens at most);
2. dedupe case-insensitively; a text found under two classes is dropped from both;
3. drop classes with fewer than ``min_per_class`` texts;
4. take the same number of texts from every class where possible (water-filling up to
   ``train + validation + test``, at most ``max_per_class``);
5. split three ways, stratified (every class gives each split the same share of its
   texts). Where the pool holds fewer texts than the three sizes ask for, the test split
   keeps its size as long as that leaves half of the pool for the other two, and train
   and validation share the rest in proportion to their sizes (:func:`split_totals`);
6. shuffle each split with the task's seed.

Given the same package files, the result is identical on every machine and every run.
:func:`load_task` caches it as JSON; the file name holds :data:`DATA_RECIPE_VERSION`,
the recipe's own ``version`` and a digest of everything else that shapes the data, so
changing a recipe (or bumping a version after changing a reader) builds it afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cmerge.errors import CmergeError
from cmerge.fsutil import atomic_write
from cmerge.suites.sources import ClassSpec, Pools, emoji, fortunes, packages, rpackages, wordnet

__all__ = [
    "DATA_RECIPE_VERSION", "RECIPES", "SPLITS", "TASKS_8", "TASKS_14", "MissingSourceError",
    "SourceRoots", "SplitSizes", "TaskRecipe", "TextTask", "build_task", "clean_pools", "clean_text",
    "default_cache_dir", "load_task", "missing_sources", "share_counts", "split_totals", "water_fill",
]

DATA_RECIPE_VERSION = 2
"""Bump when the shared steps (cleaning, dedupe, sampling, splitting) change.
Version 2 added the validation split and grew the test split from 300 to 500 texts."""

SPLITS = ("train", "validation", "test")

SETUP_HINT = "scripts/setup_text_suite.sh"


class MissingSourceError(CmergeError):
    """A task's Debian package is not installed (or not extracted) where the suite looks."""


@dataclass(frozen=True)
class TextTask:
    """One classification task: class names, their descriptions, and seeded splits."""

    name: str                       # e.g. "wordnet_noun"
    labels: list[str]               # short class names
    descriptions: list[str]         # one sentence per class, for the zero-shot head
    train: list[tuple[str, int]]       # (text, label index)
    validation: list[tuple[str, int]]  # for choosing a method's knobs; disjoint from train and test
    test: list[tuple[str, int]]        # what the benchmark reports; disjoint from the other two

    def split(self, name: str) -> list[tuple[str, int]]:
        """The examples of split ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise CmergeError(f"a text task has the splits {', '.join(SPLITS)}, not {name!r}.")
        return getattr(self, name)


# --- where the sources are --------------------------------------------------------


def cache_root() -> Path:
    """``$CMERGE_CACHE``, else ``~/.cache/cmerge``: the root every cmerge cache lives under."""
    return Path(os.environ.get("CMERGE_CACHE") or Path.home() / ".cache" / "cmerge")


def default_cache_dir() -> Path:
    """Where built tasks are cached: ``<cache root>/text``."""
    return cache_root() / "text"


R_LIBRARY_IN_CACHE = Path("debian") / "usr" / "lib" / "R" / "site-library"
R_LIBRARY_SYSTEM = Path("/usr/lib/R/site-library")


def default_r_library() -> Path:
    """The R library folder holding the CRAN data packages.

    ``$CMERGE_R_LIBRARY`` if set; else the folder the setup script extracts the
    ``r-cran-*`` packages into (``<cache root>/debian/usr/lib/R/site-library``) if it
    exists; else R's own site library if it exists (the packages installed with apt);
    else the cache folder, so that errors point at where the setup script would put them.
    """
    if os.environ.get("CMERGE_R_LIBRARY"):
        return Path(os.environ["CMERGE_R_LIBRARY"])
    extracted = cache_root() / R_LIBRARY_IN_CACHE
    if extracted.is_dir() or not R_LIBRARY_SYSTEM.is_dir():
        return extracted
    return R_LIBRARY_SYSTEM


@dataclass(frozen=True)
class SourceRoots:
    """The folder each source family is read from; tests point them at fixtures."""

    wordnet: Path = Path("/usr/share/wordnet")
    fortunes: Path = Path("/usr/share/games/fortunes")
    unicode: Path = Path("/usr/share/unicode")
    r_packages: Path = field(default_factory=default_r_library)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, Path(getattr(self, f.name)))


@dataclass(frozen=True)
class Requirement:
    """A file that must exist under one of the roots, and the Debian package that ships it."""

    package: str
    root: str      # a field name of SourceRoots
    path: str      # relative to that root

    def location(self, roots: SourceRoots) -> Path:
        return Path(getattr(roots, self.root)) / self.path


# --- recipes ------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSizes:
    """How many texts a task asks for per split, classes as equal as the data allow.

    A pool smaller than ``train + validation + test`` is shared out by :func:`split_totals`.
    """

    train: int = 1500
    validation: int = 500
    test: int = 500
    min_per_class: int = 30
    max_per_class: int | None = None

    def __post_init__(self):
        if min(self.train, self.validation, self.test) < 1:
            raise ValueError(f"SplitSizes needs at least one text per split, got train={self.train}, "
                             f"validation={self.validation}, test={self.test}")
        if self.min_per_class < 3:
            raise ValueError(f"SplitSizes.min_per_class must be >= 3 (one text per split), got {self.min_per_class}")

    @property
    def total(self) -> int:
        return self.train + self.validation + self.test


@dataclass(frozen=True)
class TaskRecipe:
    """Everything that defines one task; see the module docstring for how it is built."""

    name: str
    classes: tuple[ClassSpec, ...]
    pools: Callable[[SourceRoots], Pools]
    requires: tuple[Requirement, ...]
    seed: int
    sizes: SplitSizes = SplitSizes()
    max_chars: int = 200
    min_chars: int = 1
    version: int = 1   # bump when the reader behind `pools` changes what it returns

    def fingerprint(self, roots: SourceRoots, sizes: SplitSizes) -> str:
        spec = {
            "data_recipe_version": DATA_RECIPE_VERSION,
            "name": self.name,
            "version": self.version,
            "classes": [list(c) for c in self.classes],
            "seed": self.seed,
            "sizes": asdict(sizes),
            "max_chars": self.max_chars,
            "min_chars": self.min_chars,
            "roots": {r.root: str(Path(getattr(roots, r.root)).resolve()) for r in self.requires},
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _wordnet(path: str) -> Requirement:
    return Requirement(wordnet.PACKAGE, "wordnet", path)


def _fortune_file(name: str) -> Requirement:
    return Requirement(packages.FORTUNES_MIN if name in fortunes.MIN_FILES else packages.FORTUNES, "fortunes", name)


def _r_package(package: str) -> Requirement:
    return Requirement(packages.r_package(package), "r_packages", f"{package}/data/Rdata.rdx")


_RECIPE_LIST = [
    TaskRecipe(
        name="wordnet_noun",
        classes=wordnet.NOUN_CLASSES,
        pools=lambda roots: wordnet.lexname_pools(roots.wordnet, "n"),
        requires=(_wordnet("data.noun"),),
        seed=101,
    ),
    TaskRecipe(
        name="wordnet_verb",
        classes=wordnet.VERB_CLASSES,
        pools=lambda roots: wordnet.lexname_pools(roots.wordnet, "v"),
        requires=(_wordnet("data.verb"),),
        seed=102,
    ),
    TaskRecipe(
        name="fortune_topic",
        classes=fortunes.TOPIC_CLASSES,
        pools=lambda roots: fortunes.topic_pools(roots.fortunes, fortunes.TOPIC_FILES),
        requires=tuple(_fortune_file(f) for f in fortunes.TOPIC_FILES.values()),
        seed=103,
        min_chars=20,
    ),
    TaskRecipe(
        name="fortune_lang",
        classes=fortunes.LANGUAGE_CLASSES,
        pools=lambda roots: fortunes.language_pools(roots.fortunes, fortunes.LANGUAGE_DIRS),
        requires=(  # English reads every file of the top folder: fortunes' and fortunes-min's
            _fortune_file("computers"), _fortune_file(fortunes.MIN_FILES[0]),
            *(Requirement(fortunes.LANGUAGE_PACKAGES[k], "fortunes", d) for k, d in fortunes.LANGUAGE_DIRS.items() if d),
        ),
        seed=104,
        min_chars=20,
    ),
    TaskRecipe(
        name="emoji_group",
        classes=emoji.GROUP_CLASSES,
        pools=lambda roots: emoji.group_pools(roots.unicode),
        requires=(Requirement(emoji.PACKAGE, "unicode", str(emoji.EMOJI_TEST)),),
        seed=105,
        sizes=SplitSizes(max_per_class=200),
    ),
    TaskRecipe(
        name="austen_novel",
        classes=rpackages.AUSTEN_CLASSES,
        pools=lambda roots: rpackages.austen_pools(roots.r_packages),
        requires=(_r_package(rpackages.AUSTEN_PACKAGE),),
        seed=106,
    ),
    TaskRecipe(
        name="food_sentiment",
        classes=rpackages.FINE_FOOD_CLASSES,
        pools=lambda roots: rpackages.fine_food_pools(roots.r_packages),
        requires=(_r_package(rpackages.MODELDATA_PACKAGE),),
        seed=107,
        min_chars=20,
    ),
    TaskRecipe(
        name="word_pos",
        classes=rpackages.POS_CLASSES,
        pools=lambda roots: rpackages.part_of_speech_pools(roots.r_packages),
        requires=(_r_package(rpackages.TIDYTEXT_PACKAGE),),
        seed=108,
    ),
    TaskRecipe(
        name="wordnet_domain",
        classes=wordnet.DOMAIN_CLASSES,
        pools=lambda roots: wordnet.topic_domain_pools(roots.wordnet),
        requires=tuple(_wordnet(f) for f in wordnet.DATA_FILES.values()),
        seed=109,
    ),
    TaskRecipe(
        name="wordnet_animal",
        classes=wordnet.ANIMAL_CLASSES,
        pools=lambda roots: wordnet.category_pools(roots.wordnet, wordnet.ANIMAL_CATEGORIES),
        requires=(_wordnet("data.noun"),),
        seed=110,
    ),
    TaskRecipe(
        name="wordnet_artifact",
        classes=wordnet.ARTIFACT_CLASSES,
        pools=lambda roots: wordnet.category_pools(roots.wordnet, wordnet.ARTIFACT_CATEGORIES),
        requires=(_wordnet("data.noun"),),
        seed=111,
    ),
    TaskRecipe(
        name="wordnet_food",
        classes=wordnet.FOOD_CLASSES,
        pools=lambda roots: wordnet.category_pools(roots.wordnet, wordnet.FOOD_CATEGORIES),
        requires=(_wordnet("data.noun"),),
        seed=113,
    ),
    TaskRecipe(
        name="fortune_topic_es",
        classes=fortunes.SPANISH_TOPIC_CLASSES,
        pools=lambda roots: fortunes.topic_pools(roots.fortunes / fortunes.SPANISH_DIR, fortunes.SPANISH_TOPIC_FILES),
        requires=tuple(
            Requirement(packages.FORTUNES_TRANSLATED["es"], "fortunes", f"{fortunes.SPANISH_DIR}/{f}")
            for f in fortunes.SPANISH_TOPIC_FILES.values()
        ),
        seed=114,
        min_chars=20,
    ),
    TaskRecipe(
        name="fortune_collection",
        classes=fortunes.COLLECTION_CLASSES,
        pools=lambda roots: fortunes.topic_pools(roots.fortunes, fortunes.COLLECTION_FILES),
        requires=tuple(_fortune_file(f) for f in fortunes.COLLECTION_FILES.values()),
        seed=112,
        min_chars=20,
    ),
]
RECIPES: dict[str, TaskRecipe] = {r.name: r for r in _RECIPE_LIST}

TASKS_8: tuple[str, ...] = (
    "wordnet_noun", "wordnet_verb", "fortune_topic", "fortune_lang",
    "emoji_group", "austen_novel", "food_sentiment", "word_pos",
)
TASKS_14: tuple[str, ...] = TASKS_8 + (
    "wordnet_domain", "wordnet_animal", "wordnet_artifact", "wordnet_food",
    "fortune_topic_es", "fortune_collection",
)


def _recipe(name: str) -> TaskRecipe:
    if name not in RECIPES:
        raise CmergeError(f"unknown text task {name!r}; choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


# --- building -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, max_chars: int = 200) -> str:
    """Control characters out, whitespace runs to one space, cut at a word boundary.

    A text longer than ``max_chars`` keeps its words up to the last space within the
    limit (or the first ``max_chars`` characters if it has no space there).
    """
    text = _WHITESPACE.sub(" ", _CONTROL.sub(" ", str(text))).strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[:cut] if cut > max_chars // 2 else text[:max_chars]


def clean_pools(raw: Pools, recipe: TaskRecipe) -> list[list[str]]:
    """Per class of the recipe (in order): cleaned, deduped, sorted texts."""
    owners: dict[str, set[int]] = {}
    kept: list[dict[str, str]] = []
    for index, spec in enumerate(recipe.classes):
        texts: dict[str, str] = {}
        for text in raw.get(spec.key, ()):
            text = clean_text(text, recipe.max_chars)
            if len(text) < recipe.min_chars:
                continue
            key = text.casefold()
            texts.setdefault(key, text)
            owners.setdefault(key, set()).add(index)
        kept.append(texts)
    return [
        sorted(text for key, text in texts.items() if len(owners[key]) == 1)
        for texts in kept
    ]


def water_fill(counts: Sequence[int], total: int) -> list[int]:
    """Per-class quotas summing to ``min(total, sum(counts))``, as equal as the counts allow.

    The largest level ``c`` with ``sum(min(n, c)) <= total`` is taken; the remainder goes
    one each to the first classes (in class order) that still have texts above ``c``.
    """
    if sum(counts) <= total:
        return list(counts)
    lo, hi = 0, max(counts)
    while lo < hi:   # largest c with sum(min(n, c)) <= total
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in counts) <= total:
            lo = mid
        else:
            hi = mid - 1
    quotas = [min(n, lo) for n in counts]
    remainder = total - sum(quotas)
    for i, n in enumerate(counts):
        if remainder and n > lo:
            quotas[i] += 1
            remainder -= 1
    return quotas


def share_counts(quotas: Sequence[int], share: float, keep: int = 1) -> list[int]:
    """Per-class counts for one split: ``share`` of each quota, summing to ``round(share * sum)``.

    Largest remainders win the rounding; every class gives the split at least one text and
    keeps at least ``keep`` for the splits still to come.
    """
    exact = [q * share for q in quotas]
    counts = [int(x) for x in exact]
    order = sorted(range(len(quotas)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: round(share * sum(quotas)) - sum(counts)]:
        counts[i] += 1
    return [min(max(c, 1), q - keep) for c, q in zip(counts, quotas)]


def split_totals(available: int, sizes: SplitSizes) -> tuple[int, int, int]:
    """``(train, validation, test)`` totals for a pool of ``available`` texts.

    The asked sizes when the pool is large enough. Otherwise the test split keeps its
    size while that leaves at least half the pool for the other two (it is what every
    result is reported on), and train and validation share the rest in proportion to
    their asked sizes.
    """
    if available >= sizes.total:
        return sizes.train, sizes.validation, sizes.test
    test = min(sizes.test, available // 2)
    rest = available - test
    validation = round(rest * sizes.validation / (sizes.train + sizes.validation))
    return rest - validation, validation, test


def build_task(
    recipe: TaskRecipe, roots: SourceRoots | None = None, sizes: SplitSizes | None = None
) -> TextTask:
    """Build one task from the installed sources (no cache); see the module docstring."""
    roots = roots or SourceRoots()
    sizes = sizes or recipe.sizes
    _check_sources(recipe, roots)
    pools = clean_pools(recipe.pools(roots), recipe)

    classes = [(spec, texts) for spec, texts in zip(recipe.classes, pools) if len(texts) >= sizes.min_per_class]
    if len(classes) < 2:
        found = {spec.label: len(texts) for spec, texts in zip(recipe.classes, pools)}
        raise CmergeError(
            f"text task {recipe.name!r} has fewer than 2 classes with at least "
            f"{sizes.min_per_class} distinct texts (found {found}); check the source files."
        )
    cap = sizes.max_per_class
    counts = [len(texts) if cap is None else min(len(texts), cap) for _, texts in classes]
    quotas = water_fill(counts, sizes.total)
    _, n_validation, n_test = split_totals(sum(quotas), sizes)
    test_counts = share_counts(quotas, n_test / sum(quotas), keep=2)
    left = [q - k for q, k in zip(quotas, test_counts)]
    validation_counts = share_counts(left, n_validation / sum(left), keep=1)

    rng = random.Random(recipe.seed)
    splits: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLITS}
    for label, ((_, texts), quota, k_test, k_val) in enumerate(zip(classes, quotas, test_counts, validation_counts)):
        chosen = rng.sample(texts, quota)
        splits["test"] += [(t, label) for t in chosen[:k_test]]
        splits["validation"] += [(t, label) for t in chosen[k_test:k_test + k_val]]
        splits["train"] += [(t, label) for t in chosen[k_test + k_val:]]
    for name in SPLITS:
        rng.shuffle(splits[name])
    return TextTask(
        name=recipe.name,
        labels=[spec.label for spec, _ in classes],
        descriptions=[spec.description for spec, _ in classes],
        **splits,
    )


# --- sources present? -----------------------------------------------------------------


def _missing(recipe: TaskRecipe, roots: SourceRoots) -> list[Requirement]:
    return [r for r in recipe.requires if not r.location(roots).exists()]


def _check_sources(recipe: TaskRecipe, roots: SourceRoots) -> None:
    missing = _missing(recipe, roots)
    if missing:
        packages = " ".join(dict.fromkeys(r.package for r in missing))
        raise MissingSourceError(
            f"text task {recipe.name!r} needs the Debian package(s) {packages} "
            f"({missing[0].location(roots)} is missing); run {SETUP_HINT} as root to install them."
        )


def missing_sources(tasks: Iterable[str] = TASKS_8, roots: SourceRoots | None = None) -> list[str]:
    """The Debian packages these tasks need that are not in place (empty if all are)."""
    roots = roots or SourceRoots()
    missing: dict[str, None] = {}
    for name in tasks:
        for requirement in _missing(_recipe(name), roots):
            missing[requirement.package] = None
    return list(missing)


# --- cache ----------------------------------------------------------------------------


def load_task(
    name: str,
    *,
    cache_dir: Path | None = None,
    roots: SourceRoots | None = None,
    sizes: SplitSizes | None = None,
) -> TextTask:
    """The task ``name``, from the JSON cache if built before, else built and cached.

    ``cache_dir`` defaults to ``$CMERGE_CACHE/text`` (``~/.cache/cmerge/text``);
    ``roots`` to the Debian install locations; ``sizes`` to the recipe's own.
    Raises :class:`MissingSourceError` naming the package to install if a source is absent.
    """
    recipe = _recipe(name)
    roots = roots or SourceRoots()
    sizes = sizes or recipe.sizes
    path = task_cache_path(name, cache_dir=cache_dir, roots=roots, sizes=sizes)
    if path.exists():
        try:
            return _read_task(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass   # a torn or foreign file: build it again
    task = build_task(recipe, roots, sizes)
    _write_task(path, task)
    return task


def task_cache_path(
    name: str, *, cache_dir: Path | None = None, roots: SourceRoots | None = None, sizes: SplitSizes | None = None,
) -> Path:
    """Where :func:`load_task` caches ``name`` (same defaults). A copy of this file is all a machine
    without the Debian packages needs to load the task."""
    recipe = _recipe(name)
    roots = roots or SourceRoots()
    sizes = sizes or recipe.sizes
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"{name}-v{DATA_RECIPE_VERSION}.{recipe.version}-{recipe.fingerprint(roots, sizes)}.json"


def _read_task(path: Path) -> TextTask:
    data = json.loads(path.read_text(encoding="utf-8"))
    return TextTask(
        name=data["name"],
        labels=list(data["labels"]),
        descriptions=list(data["descriptions"]),
        **{name: [(str(t), int(y)) for t, y in data[name]] for name in SPLITS},
    )


def _write_task(path: Path, task: TextTask) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(task), ensure_ascii=False))

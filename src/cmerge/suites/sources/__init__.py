"""Readers for the installed packages the text suite is built from, one module per family.

Each module parses one on-disk format and turns it into *pools*: a mapping from a class
key to the texts of that class, together with the class table (key, short label,
human-readable description) of every task it serves. Sampling, splitting and caching
live in :mod:`cmerge.suites.text_data`; nothing here knows about seeds or sizes.

- :mod:`.wordnet` — ``wordnet-base`` (``/usr/share/wordnet/data.*``)
- :mod:`.fortunes` — ``fortunes``, ``fortunes-min`` and the translated ``fortunes-*``
- :mod:`.emoji` — ``unicode-data`` (``emoji/emoji-test.txt``)
- :mod:`.rpackages` — ``r-cran-janeaustenr``, ``r-cran-modeldata``, ``r-cran-tidytext``
  (R's lazy-load data format read without R)
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence


class ClassSpec(NamedTuple):
    """One class of a task: the key its pool is filed under, a short label, a description.

    The description is a sentence about what a text of this class looks like; the
    zero-shot head scores a text by its similarity to each description, so the wording
    matters (see docs/text_suite.md for how they were chosen).
    """

    key: str
    label: str
    description: str


Pools = Mapping[str, Sequence[str]]
"""Class key -> the raw texts of that class, before cleaning, dedupe and sampling."""

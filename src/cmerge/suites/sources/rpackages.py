"""Data sets of R packages, read from their lazy-load database without R.

Debian ships CRAN packages as ``r-cran-*``; their data lie in
``<library>/<package>/data/Rdata.rdx`` and ``Rdata.rdb``. The suite only needs the
files, not R: ``scripts/setup_text_suite.sh`` runs ``apt-get download`` and
``dpkg-deb -x`` into a cache folder (installing them with apt would pull in R itself).

Format: the ``.rdx`` index is a gzip-compressed R serialization of a list whose
``variables`` element maps each object name to ``(offset, length)`` in the ``.rdb``.
Each ``.rdb`` chunk starts with the 4-byte big-endian uncompressed length; then either a
zlib stream follows directly (``compressed = TRUE``), or one type byte does: ``Z`` for
a raw LZMA2 (xz) stream, ``2`` for bzip2, ``0`` for none. The decompressed bytes are an R
serialization, parsed with the PyPI package ``rdata`` (data frames become pandas
frames, character vectors numpy arrays).

Tasks from here: ``austen_novel`` (janeaustenr), ``food_sentiment`` (modeldata's
Amazon fine-food reviews) and ``word_pos`` (tidytext).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import warnings
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from cmerge.suites.sources import ClassSpec, Pools

XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}]


def _parse_r_serialization(data: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        # rdata warns that a bare serialization (no RDS/RDA magic) is "assumed RDS": it is.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def _decompress_chunk(chunk: bytes) -> bytes:
    body = chunk[4:]
    kind = body[:1]
    if kind == b"Z":
        return lzma.decompress(body[1:], format=lzma.FORMAT_RAW, filters=XZ_FILTERS)
    if kind == b"2":
        return bz2.decompress(body[1:])
    if kind == b"0":
        return body[1:]
    return zlib.decompress(body)


def read_lazyload_object(library: Path, package: str, name: str) -> Any:
    """One data object of an R package's ``data/Rdata`` lazy-load database."""
    base = Path(library) / package / "data" / "Rdata"
    index = _parse_r_serialization(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    offsets = index["variables"]
    if name not in offsets:
        raise KeyError(f"{package} has no data object {name!r}; it has {sorted(offsets)}")
    offset, length = (int(v) for v in offsets[name])
    with open(base.with_suffix(".rdb"), "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    return _parse_r_serialization(_decompress_chunk(chunk))


# --- janeaustenr: paragraph -> novel -------------------------------------------------

AUSTEN_PACKAGE = "janeaustenr"
MIN_PARAGRAPH_CHARS = 60


def paragraphs(lines: list[str]) -> list[str]:
    """A novel's text lines joined into paragraphs, without headings and short lines."""
    found, current = [], []
    for line in list(lines) + [""]:
        line = str(line).strip()
        if line:
            current.append(line)
            continue
        text = " ".join(current)
        current = []
        if len(text) >= MIN_PARAGRAPH_CHARS and not text.isupper():
            found.append(text)
    return found


def austen_pools(library: Path) -> Pools:
    return {
        key: paragraphs(list(read_lazyload_object(library, AUSTEN_PACKAGE, key)))
        for key in (spec.key for spec in AUSTEN_CLASSES)
    }


AUSTEN_CLASSES = (
    ClassSpec("sensesensibility", "sense and sensibility",
              "a passage from Sense and Sensibility: Elinor, Marianne, Mrs. Dashwood, Edward Ferrars, Willoughby, Colonel Brandon"),
    ClassSpec("prideprejudice", "pride and prejudice",
              "a passage from Pride and Prejudice: Elizabeth, Jane, Mr. Darcy, Mr. Bingley, Mr. and Mrs. Bennet, Wickham"),
    ClassSpec("mansfieldpark", "mansfield park",
              "a passage from Mansfield Park: Fanny Price, Edmund, Sir Thomas Bertram, Mrs. Norris, Henry and Mary Crawford"),
    ClassSpec("emma", "emma",
              "a passage from Emma: Emma Woodhouse, Mr. Knightley, Harriet Smith, Mr. Elton, Frank Churchill, Jane Fairfax"),
    ClassSpec("northangerabbey", "northanger abbey",
              "a passage from Northanger Abbey: Catherine Morland, Henry Tilney, Isabella Thorpe, John Thorpe, General Tilney"),
    ClassSpec("persuasion", "persuasion",
              "a passage from Persuasion: Anne Elliot, Captain Wentworth, Sir Walter, Lady Russell, Louisa Musgrove"),
)


# --- modeldata: fine-food review -> great / other -------------------------------------

MODELDATA_PACKAGE = "modeldata"
FINE_FOOD_OBJECTS = ("training_data", "testing_data")   # modeldata's small_fine_foods


def _column_pools(frame: Any, text_column: str, class_column: str, keys: Mapping[str, str]) -> Pools:
    pools: dict[str, list[str]] = defaultdict(list)
    for text, cls in zip(frame[text_column].tolist(), frame[class_column].tolist()):
        if isinstance(text, str) and str(cls) in keys:
            pools[keys[str(cls)]].append(text)
    return pools


def fine_food_pools(library: Path) -> Pools:
    pools: dict[str, list[str]] = defaultdict(list)
    for name in FINE_FOOD_OBJECTS:
        frame = read_lazyload_object(library, MODELDATA_PACKAGE, name)
        for key, texts in _column_pools(frame, "review", "score", {"great": "great", "other": "other"}).items():
            pools[key].extend(texts)
    return pools


FINE_FOOD_CLASSES = (
    ClassSpec("great", "great", "an enthusiastic five-star review of a food product"),
    ClassSpec("other", "other", "a disappointed or mixed review of a food product"),
)


# --- tidytext: word -> part of speech ---------------------------------------------------

TIDYTEXT_PACKAGE = "tidytext"
POS_TAGS = {
    "Noun": "noun", "Plural": "plural", "Adjective": "adjective", "Adverb": "adverb",
    "Verb (transitive)": "verb", "Verb (intransitive)": "verb",
    "Verb (usu participle)": "participle", "Interjection": "interjection",
}


def part_of_speech_pools(library: Path) -> Pools:
    frame = read_lazyload_object(library, TIDYTEXT_PACKAGE, "parts_of_speech")
    return _column_pools(frame, "word", "pos", POS_TAGS)


POS_CLASSES = (
    ClassSpec("noun", "noun", "a noun such as table, idea or dog"),
    ClassSpec("plural", "plural noun", "a plural noun such as tables, ideas or dogs"),
    ClassSpec("verb", "verb", "a verb such as make, run or think"),
    ClassSpec("participle", "participle", "a verb form ending in -ing or -ed, such as running or finished"),
    ClassSpec("adjective", "adjective", "an adjective such as big, red or happy"),
    ClassSpec("adverb", "adverb", "an adverb such as quickly, very or happily"),
    ClassSpec("interjection", "interjection", "an exclamation such as oh, wow or hello"),
)

"""Quotes from the fortune databases (Debian ``fortunes``, ``fortunes-min``, ``fortunes-XX``).

A fortune file is plain text; quotes are separated by a line holding only ``%``. The
English files lie directly in ``/usr/share/games/fortunes`` (one topic per file: ``food``,
``law``, ``science``, ...); each translated package adds a subdirectory (``de/``, ``es/``,
...) of its own files. The ``.dat`` indexes and ``.u8`` links beside them are not read,
and neither are symbolic links (``fortunes-it`` links some Italian files into the
English directory) nor nested directories (``es/off/``, the offensive sets).

Four tasks come from here: ``fortune_topic`` (which English file a quote is from,
among files named for a topic), ``fortune_collection`` (the same among ten other English
files, named for a topic or a form: riddles, definitions, poems, ...),
``fortune_topic_es`` (the Spanish files of ``fortunes-es``) and ``fortune_lang`` (which
language a quote is in).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from cmerge.suites.sources import ClassSpec, Pools, packages

SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
OVERSTRIKE = re.compile(r"[^\x08]\x08")
MIN_LETTER_SHARE = 0.6   # below this a quote is ASCII art, a table or a banner
SKIPPED_FILES = {"cs/klasik-sk"}   # Slovak proverbs shipped in the Czech directory
MIN_FILES = ("fortunes", "literature", "riddles")   # shipped by fortunes-min, the rest by fortunes


def read_fortune_file(path: Path) -> list[str]:
    """The quotes of one fortune file, with terminal overstrike (``_\\b``) undone."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    quotes = []
    for quote in SEPARATOR.split(text.replace("\r\n", "\n")):
        while "\x08" in quote:
            undone = OVERSTRIKE.sub("", quote)
            quote = undone if undone != quote else quote.replace("\x08", "")
        quote = quote.strip()
        if quote and _mostly_letters(quote):
            quotes.append(quote)
    return quotes


def _mostly_letters(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= MIN_LETTER_SHARE * len(visible)


def fortune_files(directory: Path) -> list[Path]:
    """The fortune files of one directory: regular files, no indexes, links or subfolders."""
    return sorted(
        p for p in Path(directory).iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        and not p.name.endswith(".fortunes-pre")
    )


def topic_pools(root: Path, files: Mapping[str, str]) -> Pools:
    """Quotes filed under the topic key of the English file they come from."""
    return {key: read_fortune_file(Path(root) / name) for key, name in files.items()}


def language_pools(root: Path, languages: Mapping[str, str]) -> Pools:
    """Quotes filed under their language; ``languages`` maps key -> subdirectory ("" = English)."""
    pools = {}
    for key, subdir in languages.items():
        quotes: list[str] = []
        for path in fortune_files(Path(root) / subdir):
            if f"{subdir}/{path.name}" in SKIPPED_FILES:
                continue
            quotes.extend(read_fortune_file(path))
        pools[key] = quotes
    return pools


# --- class tables -----------------------------------------------------------------

TOPIC_FILES = {
    "computers": "computers", "education": "education", "food": "food", "kids": "kids",
    "law": "law", "love": "love", "medicine": "medicine", "politics": "politics",
    "science": "science", "sports": "sports", "startrek": "startrek", "work": "work",
    "drugs": "drugs",
}
TOPIC_CLASSES = (
    ClassSpec("computers", "computers", "a joke or quote about computers and programming"),
    ClassSpec("education", "education", "a joke or quote about school, students and teachers"),
    ClassSpec("food", "food", "a joke or quote about food and eating"),
    ClassSpec("kids", "kids", "a joke or quote about children and parents"),
    ClassSpec("law", "law", "a joke or quote about law, lawyers and courts"),
    ClassSpec("love", "love", "a joke or quote about love"),
    ClassSpec("medicine", "medicine", "a joke or quote about doctors and medicine"),
    ClassSpec("politics", "politics", "a joke or quote about politics and government"),
    ClassSpec("science", "science", "a joke or quote about science"),
    ClassSpec("sports", "sports", "a joke or quote about sports"),
    ClassSpec("startrek", "star trek", "a quote from Star Trek"),
    ClassSpec("work", "work", "a joke or quote about work and jobs"),
    ClassSpec("drugs", "drugs", "a joke or quote about alcohol, smoking and drugs"),
)

COLLECTION_FILES = {
    key: key
    for key in ("art", "definitions", "linux", "literature", "men-women", "perl", "riddles",
                "songs-poems", "zippy", "wisdom")
}
COLLECTION_CLASSES = (
    ClassSpec("art", "art", "a quote about art, artists, actors and films"),
    ClassSpec("definitions", "definitions", "a humorous dictionary definition of a word"),
    ClassSpec("linux", "linux", "a quote about Linux"),
    ClassSpec("literature", "literature", "a quote from a novel or play"),
    ClassSpec("men-women", "men and women", "a joke about men and women"),
    ClassSpec("perl", "perl", "a quote about Perl programming"),
    ClassSpec("riddles", "riddles", "a riddle with a question and a punchline"),
    ClassSpec("songs-poems", "songs and poems", "lines from a song or a poem"),
    ClassSpec("zippy", "zippy", "a surreal quote from Zippy the Pinhead"),
    ClassSpec("wisdom", "wisdom", "a wise saying about life"),
)

SPANISH_DIR = "es"
SPANISH_TOPIC_FILES = {
    key: f"{key}.fortunes"
    for key in ("amistad", "arte", "ciencia", "familia", "informatica", "libertad",
                "poder", "sentimientos", "vida", "verdad", "leydemurphy", "pintadas")
}
SPANISH_TOPIC_CLASSES = (
    ClassSpec("amistad", "friendship", "a Spanish quote about friendship"),
    ClassSpec("arte", "art", "a Spanish quote about art"),
    ClassSpec("ciencia", "science", "a Spanish quote about science"),
    ClassSpec("familia", "family", "a Spanish quote about family"),
    ClassSpec("informatica", "computers", "a Spanish quote about computers"),
    ClassSpec("libertad", "freedom", "a Spanish quote about freedom"),
    ClassSpec("poder", "power", "a Spanish quote about power"),
    ClassSpec("sentimientos", "feelings", "a Spanish quote about feelings"),
    ClassSpec("vida", "life", "a Spanish quote about life"),
    ClassSpec("verdad", "truth", "a Spanish quote about truth"),
    ClassSpec("leydemurphy", "murphy's law", "a Spanish quote about Murphy's law: things going wrong"),
    ClassSpec("pintadas", "graffiti", "a Spanish quote about graffiti on walls"),
)

LANGUAGE_DIRS = {
    "en": "", "de": "de", "es": "es", "it": "it", "ru": "ru", "pl": "pl", "cs": "cs", "eo": "eo",
}
LANGUAGE_PACKAGES = {"en": packages.FORTUNES, **packages.FORTUNES_TRANSLATED}
"""The package of each language's files; English also reads fortunes-min's files (:data:`MIN_FILES`)."""
LANGUAGE_CLASSES = (
    ClassSpec("en", "english", "a sentence in English"),
    ClassSpec("de", "german", "a sentence in German"),
    ClassSpec("es", "spanish", "a sentence in Spanish"),
    ClassSpec("it", "italian", "a sentence in Italian"),
    ClassSpec("ru", "russian", "a sentence in Russian"),
    ClassSpec("pl", "polish", "a sentence in Polish"),
    ClassSpec("cs", "czech", "a sentence in Czech"),
    ClassSpec("eo", "esperanto", "a sentence in Esperanto"),
)

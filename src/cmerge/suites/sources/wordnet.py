"""WordNet 3.0 glosses (Debian ``wordnet-base``, ``/usr/share/wordnet/data.{noun,verb,adj,adv}``).

A data line is ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt
(symbol offset pos source/target){p_cnt} [frames] | gloss`` (WordNet's wndb(5)).
The text of an example is the definition part of the gloss, without the quoted usage
examples that follow it (they often contain the headword itself).

Four kinds of class are read off a synset:

- its lexicographer file (``noun.animal``, ``verb.motion``, ...): the ``wordnet_noun``
  and ``wordnet_verb`` tasks;
- its topic domain (``;c`` pointer, e.g. to ``law`` or ``music``): ``wordnet_domain``;
- the category it falls under when following hypernym pointers (``@``, ``@i``) upwards,
  among a few chosen category synsets (``mammal``, ``bird``, ...): ``wordnet_animal``
  ``wordnet_artifact`` and ``wordnet_food``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from cmerge.suites.sources import ClassSpec, Pools, packages

PACKAGE = packages.WORDNET
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}

# lexnames(5WN): lexicographer file number -> name (nouns and verbs only).
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication",
    11: "noun.event", 12: "noun.feeling", 13: "noun.food", 14: "noun.group",
    15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 29: "verb.body", 30: "verb.change",
    31: "verb.cognition", 32: "verb.communication", 33: "verb.competition",
    34: "verb.consumption", 35: "verb.contact", 36: "verb.creation", 37: "verb.emotion",
    38: "verb.motion", 39: "verb.perception", 40: "verb.possession", 41: "verb.social",
    42: "verb.stative", 43: "verb.weather",
}
HYPERNYM_POINTERS = ("@", "@i")
TOPIC_POINTER = ";c"
LEADING_TAG = re.compile(r"^(\([^()]*\)\s*)+")


@dataclass(frozen=True)
class Synset:
    """One data line: its id ``(offset, pos)``, lexicographer file, lemmas, pointers, gloss."""

    offset: str
    pos: str                                   # n, v, a (satellites folded in) or r
    lexname: str                               # "" for adjectives and adverbs
    lemmas: tuple[str, ...]
    pointers: tuple[tuple[str, str, str], ...]  # (symbol, target offset, target pos)
    gloss: str

    @property
    def id(self) -> tuple[str, str]:
        return self.offset, self.pos

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples and without a leading ``(domain)`` tag.

        Many glosses open with the field they belong to, e.g. ``(physics) a unit of ...``;
        that tag would hand the ``wordnet_domain`` label to the model.
        """
        cut = self.gloss.find('"')
        text = self.gloss if cut < 0 else self.gloss[:cut]
        text = LEADING_TAG.sub("", text.strip())
        return text.strip().rstrip(";").strip()


def _pos(code: str) -> str:
    return "a" if code == "s" else code


def parse_line(line: str) -> Synset | None:
    """A data-file line as a Synset, or None for the licence header (lines starting with two spaces)."""
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition("| ")
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
    at = 4 + 2 * n_words
    n_pointers = int(fields[at])
    pointers = tuple(
        (fields[at + 1 + 4 * i], fields[at + 2 + 4 * i], _pos(fields[at + 3 + 4 * i]))
        for i in range(n_pointers)
    )
    return Synset(
        offset=fields[0],
        pos=_pos(fields[2]),
        lexname=LEXNAMES.get(int(fields[1]), ""),
        lemmas=lemmas,
        pointers=pointers,
        gloss=gloss.strip(),
    )


def read_synsets(root: Path, pos: str) -> tuple[Synset, ...]:
    """Every synset of one part of speech (``n``, ``v``, ``a`` or ``r``) under ``root``."""
    path = Path(root) / DATA_FILES[pos]
    stat = path.stat()  # in the memo key, so that a rewritten file is read again
    return _read_data_file(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _read_data_file(path: Path, mtime_ns: int, size: int) -> tuple[Synset, ...]:
    synsets = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            synset = parse_line(line)
            if synset is not None:
                synsets.append(synset)
    return tuple(synsets)


def lexname_pools(root: Path, pos: str) -> Pools:
    """Definitions filed under their lexicographer file name (``noun.animal``, ...)."""
    pools: dict[str, list[str]] = defaultdict(list)
    for synset in read_synsets(Path(root), pos):
        pools[synset.lexname].append(synset.definition)
    return pools


def topic_domain_pools(root: Path) -> Pools:
    """Definitions (all parts of speech) filed under the first lemma of their topic domain."""
    root = Path(root)
    nouns = {s.offset: s for s in read_synsets(root, "n")}
    pools: dict[str, list[str]] = defaultdict(list)
    for pos in DATA_FILES:
        for synset in read_synsets(root, pos):
            for symbol, offset, target_pos in synset.pointers:
                if symbol == TOPIC_POINTER and target_pos == "n" and offset in nouns:
                    pools[nouns[offset].lemmas[0].lower()].append(synset.definition)
    return pools


def category_pools(root: Path, categories: Sequence[tuple[str, str, str]]) -> Pools:
    """Noun definitions filed under the one category their hypernym chain reaches.

    ``categories`` holds ``(key, lemma, lexname)``: every noun synset with that lemma in
    that lexicographer file is a category root for ``key``. A synset reaching roots of
    two keys is ambiguous and left out; the roots themselves are left out too.
    """
    synsets = {s.offset: s for s in read_synsets(Path(root), "n")}
    root_key: dict[str, str] = {}
    for key, lemma, lexname in categories:
        for synset in synsets.values():
            if synset.lexname == lexname and lemma in synset.lemmas:
                root_key[synset.offset] = key

    parents = {
        s.offset: [o for sym, o, p in s.pointers if sym in HYPERNYM_POINTERS and p == "n"]
        for s in synsets.values()
    }
    reached: dict[str, frozenset[str]] = {}

    def keys_above(offset: str) -> frozenset[str]:
        # Depth-first with a memo; a parent already on the path (a malformed cycle) is skipped.
        path, on_path = [offset], {offset}
        while path:
            node = path[-1]
            todo = next((p for p in parents.get(node, ()) if p not in reached and p not in on_path), None)
            if todo is not None:
                path.append(todo)
                on_path.add(todo)
                continue
            path.pop()
            on_path.discard(node)
            keys = set()
            for p in parents.get(node, ()):
                keys |= reached.get(p, frozenset())
                if p in root_key:
                    keys.add(root_key[p])
            reached[node] = frozenset(keys)
        return reached[offset]

    pools: dict[str, list[str]] = defaultdict(list)
    for offset, synset in synsets.items():
        if offset in root_key:
            continue
        keys = keys_above(offset)
        if len(keys) == 1:
            pools[next(iter(keys))].append(synset.definition)
    return pools


# --- class tables -----------------------------------------------------------------

NOUN_CLASSES = (
    ClassSpec("noun.act", "act", "a definition of a word for an act, action or activity that people do"),
    ClassSpec("noun.animal", "animal", "a definition of a word for an animal"),
    ClassSpec("noun.artifact", "artifact", "a definition of a word for a man-made object, device or structure"),
    ClassSpec("noun.attribute", "attribute", "a definition of a word for an attribute: a property or quality of something"),
    ClassSpec("noun.body", "body", "a definition of a word for a part of the human body"),
    ClassSpec("noun.cognition", "cognition", "a definition of a word for cognition: an idea, belief, knowledge or field of study"),
    ClassSpec("noun.communication", "communication", "a definition of a word for communication: language, speech, writing or a message"),
    ClassSpec("noun.event", "event", "a definition of a word for an event or happening"),
    ClassSpec("noun.feeling", "feeling", "a definition of a word for a feeling or emotion"),
    ClassSpec("noun.food", "food", "a definition of a word for a food or drink"),
    ClassSpec("noun.group", "group", "a definition of a word for a group or collection of people or things"),
    ClassSpec("noun.location", "location", "a definition of a word for a place, region or geographic location"),
    ClassSpec("noun.object", "object", "a definition of a word for a natural object or landform"),
    ClassSpec("noun.person", "person", "a definition of a word for a person: someone who does something or has a role"),
    ClassSpec("noun.phenomenon", "phenomenon", "a definition of a word for a natural phenomenon"),
    ClassSpec("noun.plant", "plant", "a definition of a word for a plant"),
    ClassSpec("noun.possession", "possession", "a definition of a word for possession: money, property or a financial transaction"),
    ClassSpec("noun.quantity", "quantity", "a definition of a word for a quantity, amount or unit of measure"),
    ClassSpec("noun.state", "state", "a definition of a word for a state or condition, such as an illness"),
    ClassSpec("noun.substance", "substance", "a definition of a word for a chemical substance or material"),
)

VERB_CLASSES = (
    ClassSpec("verb.body", "body", "a definition of a verb about an action of the body, such as breathing, sleeping, dressing or being ill"),
    ClassSpec("verb.change", "change", "a definition of a verb about changing something, such as making it bigger, smaller, harder or different"),
    ClassSpec("verb.cognition", "cognition", "a definition of a verb about thinking, such as knowing, believing, judging or deciding"),
    ClassSpec("verb.communication", "communication", "a definition of a verb about communicating, such as speaking, telling, asking or writing"),
    ClassSpec("verb.competition", "competition", "a definition of a verb about competing, such as fighting, attacking, defending or playing"),
    ClassSpec("verb.consumption", "consumption", "a definition of a verb about consuming, such as eating, drinking or using up"),
    ClassSpec("verb.contact", "contact", "a definition of a verb about contact, such as touching, hitting, cutting or attaching"),
    ClassSpec("verb.creation", "creation", "a definition of a verb about creating, such as making, building, cooking or painting"),
    ClassSpec("verb.emotion", "emotion", "a definition of a verb about feeling, such as loving, fearing, pleasing or annoying"),
    ClassSpec("verb.motion", "motion", "a definition of a verb about moving, such as going, walking, flying or travelling"),
    ClassSpec("verb.perception", "perception", "a definition of a verb about perceiving, such as seeing, hearing, smelling or feeling"),
    ClassSpec("verb.possession", "possession", "a definition of a verb about possession, such as buying, selling, giving or owning"),
    ClassSpec("verb.social", "social", "a definition of a verb about social activity, such as working, governing, marrying or meeting"),
    ClassSpec("verb.stative", "stative", "a definition of a verb about being, such as existing, lasting, having or being similar"),
    ClassSpec("verb.weather", "weather", "a definition of a verb about weather, such as raining, snowing, shining or thundering"),
)

DOMAIN_CLASSES = (
    ClassSpec("law", "law", "a definition of a legal term"),
    ClassSpec("military", "military", "a definition of a military term"),
    ClassSpec("chemistry", "chemistry", "a definition of a term from chemistry"),
    ClassSpec("computer science", "computing", "a definition of a computing term"),
    ClassSpec("greek mythology", "greek myth", "a definition of a figure from Greek mythology"),
    ClassSpec("biology", "biology", "a definition of a term from biology"),
    ClassSpec("physics", "physics", "a definition of a term from physics"),
    ClassSpec("music", "music", "a definition of a musical term"),
    ClassSpec("botany", "botany", "a definition of a term from botany"),
    ClassSpec("mathematics", "mathematics", "a definition of a mathematical term"),
    ClassSpec("baseball", "baseball", "a definition of a baseball term"),
    ClassSpec("statistics", "statistics", "a definition of a term from statistics"),
    ClassSpec("cooking", "cooking", "a definition of a cooking term"),
    ClassSpec("medicine", "medicine", "a definition of a medical term"),
)

ANIMAL_CATEGORIES = (
    ("mammal", "mammal", "noun.animal"),
    ("bird", "bird", "noun.animal"),
    ("fish", "fish", "noun.animal"),
    ("reptile", "reptile", "noun.animal"),
    ("amphibian", "amphibian", "noun.animal"),
    ("insect", "insect", "noun.animal"),
    ("arachnid", "arachnid", "noun.animal"),
    ("crustacean", "crustacean", "noun.animal"),
    ("mollusk", "mollusk", "noun.animal"),
    ("worm", "worm", "noun.animal"),
)
ANIMAL_CLASSES = (
    ClassSpec("mammal", "mammal", "a definition of a mammal"),
    ClassSpec("bird", "bird", "a definition of a bird"),
    ClassSpec("fish", "fish", "a definition of a fish"),
    ClassSpec("reptile", "reptile", "a definition of a reptile"),
    ClassSpec("amphibian", "amphibian", "a definition of an amphibian"),
    ClassSpec("insect", "insect", "a definition of an insect"),
    ClassSpec("arachnid", "arachnid", "a definition of a spider, mite or scorpion"),
    ClassSpec("crustacean", "crustacean", "a definition of a crustacean"),
    ClassSpec("mollusk", "mollusk", "a definition of a mollusk"),
    ClassSpec("worm", "worm", "a definition of a worm"),
)

ARTIFACT_CATEGORIES = (
    ("vehicle", "vehicle", "noun.artifact"),
    ("weapon", "weapon", "noun.artifact"),
    ("clothing", "clothing", "noun.artifact"),
    ("building", "building", "noun.artifact"),
    ("furniture", "furniture", "noun.artifact"),
    ("container", "container", "noun.artifact"),
    ("musical instrument", "musical instrument", "noun.artifact"),
    ("tool", "hand tool", "noun.artifact"),
    ("fabric", "fabric", "noun.artifact"),
    ("drug", "drug", "noun.artifact"),
    ("electronic equipment", "electronic equipment", "noun.artifact"),
    ("way", "way", "noun.artifact"),
)
ARTIFACT_CLASSES = (
    ClassSpec("vehicle", "vehicle", "a definition of a vehicle"),
    ClassSpec("weapon", "weapon", "a definition of a weapon"),
    ClassSpec("clothing", "clothing", "a definition of a piece of clothing"),
    ClassSpec("building", "building", "a definition of a building"),
    ClassSpec("furniture", "furniture", "a definition of a piece of furniture"),
    ClassSpec("container", "container", "a definition of a container"),
    ClassSpec("musical instrument", "instrument", "a definition of a musical instrument"),
    ClassSpec("tool", "hand tool", "a definition of a hand tool"),
    ClassSpec("fabric", "fabric", "a definition of a fabric or cloth"),
    ClassSpec("drug", "drug", "a definition of a drug or medicine"),
    ClassSpec("electronic equipment", "electronics", "a definition of a piece of electronic equipment"),
    ClassSpec("way", "way", "a definition of a road, path or passage"),
)

FOOD_CATEGORIES = (
    ("beverage", "beverage", "noun.food"),
    ("dish", "dish", "noun.food"),
    ("baked goods", "baked goods", "noun.food"),
    ("dessert", "dessert", "noun.food"),
    ("vegetable", "vegetable", "noun.food"),
    ("edible fruit", "edible fruit", "noun.food"),
    ("meat", "meat", "noun.food"),
    ("cheese", "cheese", "noun.food"),
    ("candy", "candy", "noun.food"),
    ("seasoning", "flavorer", "noun.food"),
)
FOOD_CLASSES = (
    ClassSpec("beverage", "beverage", "a definition of a drink"),
    ClassSpec("dish", "dish", "a definition of a prepared dish"),
    ClassSpec("baked goods", "baked goods", "a definition of baked goods such as bread or cake"),
    ClassSpec("dessert", "dessert", "a definition of a dessert"),
    ClassSpec("vegetable", "vegetable", "a definition of a vegetable"),
    ClassSpec("edible fruit", "fruit", "a definition of a fruit"),
    ClassSpec("meat", "meat", "a definition of a kind of meat"),
    ClassSpec("cheese", "cheese", "a definition of a cheese"),
    ClassSpec("candy", "candy", "a definition of a candy or sweet"),
    ClassSpec("seasoning", "seasoning", "a definition of a spice, herb or seasoning"),
)

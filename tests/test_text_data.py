"""The text suite's data preparation, on small fixture files written in each source's format.

Nothing here needs the Debian packages or the backbone: every test writes its own
WordNet data files, fortune files, emoji-test.txt or R lazy-load database under
``tmp_path`` and points :class:`SourceRoots` at them.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from cmerge.errors import CmergeError
from cmerge.suites import text_data as td
from cmerge.suites.sources import emoji, fortunes, rpackages, wordnet
from cmerge.suites.text_data import MissingSourceError, SourceRoots, SplitSizes

SMALL = SplitSizes(train=20, validation=6, test=8, min_per_class=4)


# --- fixture writers: WordNet ---------------------------------------------------------

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by\n"


def synset_line(offset, lexfile, ss_type, words, pointers=(), gloss="", frames=""):
    """One line of a WordNet data file (wndb(5))."""
    parts = [f"{offset:08d}", f"{lexfile:02d}", ss_type, f"{len(words):02x}"]
    for w in words:
        parts += [w.replace(" ", "_"), "0"]
    parts.append(f"{len(pointers):03d}")
    for symbol, target, pos in pointers:
        parts += [symbol, f"{target:08d}", pos, "0000"]
    if frames:
        parts.append(frames)
    return " ".join(parts) + f" | {gloss}  \n"


def write_wordnet(root: Path) -> Path:
    """Nouns in three lexicographer files with a small hypernym tree, verbs, adj, adv."""
    root.mkdir(parents=True, exist_ok=True)
    noun = [LICENCE]
    # Category roots for category_pools: 100 = mammal, 200 = bird (noun.animal = 5).
    noun.append(synset_line(100, 5, "n", ["mammal"], gloss="a warm-blooded vertebrate"))
    noun.append(synset_line(200, 5, "n", ["bird"], gloss="a warm-blooded egg-laying vertebrate"))
    noun.append(synset_line(300, 5, "n", ["bat"], [("@", 100, "n")], gloss="a nocturnal mouselike mammal"))
    noun.append(synset_line(301, 5, "n", ["griffin"], [("@", 100, "n"), ("@", 200, "n")], gloss="both: ambiguous"))
    noun.append(synset_line(302, 5, "n", ["Rover"], [("@i", 300, "n")], gloss="a famous bat"))
    # Food categories (noun.food = 13): 250 = beverage, 251 = dish.
    noun.append(synset_line(250, 13, "n", ["beverage"], gloss="any liquid suitable for drinking"))
    noun.append(synset_line(251, 13, "n", ["dish"], gloss="a particular item of prepared food"))
    for i in range(8):
        noun.append(synset_line(400 + i, 5, "n", [f"mammal{i}"], [("@", 100, "n")], gloss=f"a hairy animal number {i}"))
        noun.append(synset_line(500 + i, 5, "n", [f"bird{i}"], [("@", 200, "n")], gloss=f"a feathered animal number {i}"))
        category = 250 if i % 2 else 251
        noun.append(synset_line(600 + i, 13, "n", [f"food{i}"], [("@", category, "n")],
                                gloss=f'a tasty dish number {i}; "they ate food{i}"'))
        noun.append(synset_line(700 + i, 18, "n", [f"person{i}"], gloss=f"(informal) a person of kind {i}"))
    # Topic domains: 800 = law, 801 = music; pointed at with ;c from all parts of speech.
    noun.append(synset_line(800, 9, "n", ["law", "jurisprudence"], gloss="the collection of rules"))
    noun.append(synset_line(801, 9, "n", ["music"], gloss="an artistic form of sound"))
    for i in range(6):
        noun.append(synset_line(810 + i, 4, "n", [f"tort{i}"], [(";c", 800, "n")], gloss=f"(law) a wrongful act {i}"))
    noun.append(synset_line(820, 1, "n", ["typo"], gloss="a lexicographer file out of range"))
    (root / "data.noun").write_text("".join(noun), encoding="utf-8")

    verb = [LICENCE]
    for i in range(6):
        verb.append(synset_line(900 + i, 38, "v", [f"go{i}"], gloss=f"move in way {i}", frames="01 + 02 00"))
        verb.append(synset_line(950 + i, 34, "v", [f"eat{i}"], [(";c", 801, "n")], gloss=f"take in food {i}"))
    (root / "data.verb").write_text("".join(verb), encoding="utf-8")

    adj = [LICENCE] + [
        synset_line(1000 + i, 0, "s", [f"legal{i}"], [(";c", 800, "n")], gloss=f"relating to courts {i}")
        for i in range(4)
    ]
    (root / "data.adj").write_text("".join(adj), encoding="utf-8")
    (root / "data.adv").write_text(LICENCE + synset_line(1100, 2, "r", ["loudly"], [(";c", 801, "n")], gloss="with volume"))
    return root


# --- fixture writers: fortunes --------------------------------------------------------


def write_fortune_file(path: Path, quotes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n%\n".join(quotes) + "\n%\n", encoding="utf-8")
    path.with_name(path.name + ".dat").write_bytes(b"\x00\x00\x00\x02binary index")


def write_fortunes(root: Path) -> Path:
    english = {**fortunes.TOPIC_FILES, **fortunes.COLLECTION_FILES, "fortunes": "fortunes"}   # + fortunes-min's file
    for key, name in english.items():
        quotes = [f"A {key} joke number {i},\n\tabout {key} things.\n\t\t-- Someone" for i in range(6)]
        quotes.append("+--+--+\n|##|##|\n+--+--+")   # ASCII art: left out
        write_fortune_file(root / name, quotes)
    for key, subdir in fortunes.LANGUAGE_DIRS.items():
        if subdir:
            write_fortune_file(root / subdir / "sprueche", [f"Spruch {key} Nummer {i} mit Worten" for i in range(6)])
    for key, name in fortunes.SPANISH_TOPIC_FILES.items():
        write_fortune_file(root / fortunes.SPANISH_DIR / name, [f"Una frase sobre {key}, la número {i}" for i in range(5)])
    # Things a reader must skip: a nested directory, a link into a language directory,
    # and the Slovak file that fortunes-cs ships among the Czech ones.
    write_fortune_file(root / "es" / "off" / "rude", ["palabras feas que no deben leerse"] * 3)
    (root / "adams").symlink_to(root / "it" / "sprueche")
    write_fortune_file(root / "cs" / "klasik-sk", [f"slovenské príslovie {i} je tu" for i in range(6)])
    return root


# --- fixture writers: emoji ------------------------------------------------------------

EMOJI_TEST = """\
# emoji-test.txt
# Status: fully-qualified, minimally-qualified, unqualified, component

# group: Smileys & Emotion

# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
1F603 ; fully-qualified # 😃 E0.6 grinning face with big eyes
263A FE0F ; fully-qualified # ☺️ E0.6 smiling face
263A ; unqualified # ☺ E0.6 smiling face
1F642 ; fully-qualified # 🙂 E1.0 slightly smiling face
1F60D ; fully-qualified # 😍 E0.6 smiling face with heart-eyes

# group: People & Body

# subgroup: hand-fingers-open
1F44B ; fully-qualified # 👋 E0.6 waving hand
1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone
1F91A ; fully-qualified # 🤚 E3.0 raised back of hand
270B ; fully-qualified # ✋ E0.6 raised hand
1F596 ; fully-qualified # 🖖 E1.0 vulcan salute

# group: Component

# subgroup: skin-tone
1F3FB ; component # 🏻 E1.0 light skin tone
1F9B0 ; component # 🦰 E11.0 red hair

# group: Flags

# subgroup: country-flag
1F1E6 1F1E8 ; fully-qualified # 🇦🇨 E2.0 flag: Ascension Island
1F1E9 1F1EA ; fully-qualified # 🇩🇪 E2.0 flag: Germany
1F1EB 1F1F7 ; fully-qualified # 🇫🇷 E2.0 flag: France
1F1EE 1F1F9 ; fully-qualified # 🇮🇹 E2.0 flag: Italy

#EOF
"""


def write_unicode(root: Path) -> Path:
    (root / "emoji").mkdir(parents=True, exist_ok=True)
    (root / "emoji" / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    return root


# --- fixture writers: an R lazy-load database -------------------------------------------


def r_serialize(obj) -> bytes:
    """R's XDR serialization of a Python object, via rdata's writer."""
    rdata = pytest.importorskip("rdata")
    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj))


def write_lazyload_db(library: Path, package: str, objects: dict, compression: str) -> None:
    """``<library>/<package>/data/Rdata.{rdx,rdb}`` holding ``objects``, chunks zlib- or xz-compressed."""
    import numpy as np

    data = library / package / "data"
    data.mkdir(parents=True, exist_ok=True)
    rdb, variables = b"", {}
    for name, obj in objects.items():
        payload = r_serialize(obj)
        if compression == "xz":
            body = b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
        else:
            body = zlib.compress(payload)
        chunk = struct.pack(">I", len(payload)) + body
        variables[name] = np.array([len(rdb), len(chunk)], dtype=np.int32)
        rdb += chunk
    (data / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": variables, "references": {}, "compressed": np.array([3 if compression == "xz" else 1])}
    (data / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))


def write_r_packages(library: Path) -> Path:
    pd = pytest.importorskip("pandas")
    import numpy as np

    novels = {}
    for spec in rpackages.AUSTEN_CLASSES:
        lines = [spec.label.upper(), "", "CHAPTER I", ""]
        for i in range(6):
            lines += [f"In {spec.key} paragraph {i} the heroine walked to the", "village and back again.", ""]
        lines += ["Too short.", ""]
        novels[spec.key] = np.array(lines)
    write_lazyload_db(library, "janeaustenr", novels, compression="zlib")

    def reviews(offset):
        return pd.DataFrame({
            "product": [f"B{offset + i:09d}" for i in range(10)],
            "review": [f"review {offset + i}: this snack is {'great' if i % 2 else 'meh'} for me" for i in range(10)],
            "score": pd.Categorical(["great" if i % 2 else "other" for i in range(10)]),
        })
    write_lazyload_db(library, "modeldata", {"training_data": reviews(0), "testing_data": reviews(100)}, "xz")

    words = [f"noun{i}" for i in range(6)] + [f"adj{i}" for i in range(6)] + ["fast", "fast"]
    tags = ["Noun"] * 6 + ["Adjective"] * 6 + ["Adjective", "Adverb"]   # "fast": ambiguous
    write_lazyload_db(library, "tidytext", {"parts_of_speech": pd.DataFrame({"word": words, "pos": tags})}, "zlib")
    return library


@pytest.fixture
def roots(tmp_path) -> SourceRoots:
    """Every source family except the R packages (those need rdata; see ``r_roots``)."""
    return SourceRoots(
        wordnet=write_wordnet(tmp_path / "wordnet"),
        fortunes=write_fortunes(tmp_path / "fortunes"),
        unicode=write_unicode(tmp_path / "unicode"),
        r_packages=tmp_path / "no-r-library",
    )


@pytest.fixture
def r_roots(tmp_path) -> SourceRoots:
    return SourceRoots(
        wordnet=tmp_path / "none", fortunes=tmp_path / "none", unicode=tmp_path / "none",
        r_packages=write_r_packages(tmp_path / "site-library"),
    )


# --- readers ------------------------------------------------------------------------


def test_wordnet_line_parsing_and_definition():
    line = synset_line(5, 5, "s", ["big cat", "lion"], [("@", 7, "n"), (";c", 9, "n")],
                       gloss='(zoology) large tawny feline; "the lion roared"')
    s = wordnet.parse_line(line)
    assert (s.offset, s.pos, s.lexname) == ("00000005", "a", "noun.animal")
    assert s.lemmas == ("big cat", "lion")
    assert s.pointers == (("@", "00000007", "n"), (";c", "00000009", "n"))
    assert s.definition == "large tawny feline"
    assert wordnet.parse_line(LICENCE) is None


def test_wordnet_pools(tmp_path):
    root = write_wordnet(tmp_path)
    lex = wordnet.lexname_pools(root, "n")
    assert len(lex["noun.food"]) == 2 + 8 and "a tasty dish number 0" in lex["noun.food"]
    assert lex["noun.person"][0] == "a person of kind 0"       # leading "(informal)" stripped
    assert "" in lex                                           # lexfile 1 is not a noun file
    assert len(wordnet.lexname_pools(root, "v")["verb.motion"]) == 6

    domains = wordnet.topic_domain_pools(root)
    assert len(domains["law"]) == 6 + 4                        # nouns and adjectives
    assert "a wrongful act 0" in domains["law"]
    assert sorted(domains["music"]) == sorted([f"take in food {i}" for i in range(6)] + ["with volume"])

    cats = wordnet.category_pools(root, [("mammal", "mammal", "noun.animal"), ("bird", "bird", "noun.animal")])
    assert "a nocturnal mouselike mammal" in cats["mammal"]
    assert "a famous bat" in cats["mammal"]                    # reached through an instance pointer
    assert "both: ambiguous" not in cats["mammal"] + cats["bird"]
    assert "a warm-blooded vertebrate" not in cats["mammal"]   # the category root itself
    assert len(cats["bird"]) == 8


def test_wordnet_categories_survive_a_hypernym_cycle(tmp_path):
    lines = [
        synset_line(1, 5, "n", ["mammal"], gloss="root"),
        synset_line(2, 5, "n", ["a"], [("@", 3, "n"), ("@", 1, "n")], gloss="in a cycle with b"),
        synset_line(3, 5, "n", ["b"], [("@", 2, "n")], gloss="in a cycle with a"),
    ]
    (tmp_path / "data.noun").write_text("".join(lines), encoding="utf-8")
    pools = wordnet.category_pools(tmp_path, [("mammal", "mammal", "noun.animal")])
    assert "in a cycle with b" in pools["mammal"]


def test_fortune_reader_undoes_overstrike_and_skips_art(tmp_path):
    path = tmp_path / "drugs"
    path.write_bytes("Drink *__\b\bis* fun.\n%\n|##|##|\n%\r\n\n%\nZweite Zeile äöü\n".encode())
    assert fortunes.read_fortune_file(path) == ["Drink *is* fun.", "Zweite Zeile äöü"]
    latin = tmp_path / "latin"
    latin.write_bytes("caf\xe9 au lait\n%\n".encode("latin-1"))
    assert fortunes.read_fortune_file(latin) == ["café au lait"]


def test_fortune_language_pools_skip_links_indexes_and_subfolders(tmp_path):
    root = write_fortunes(tmp_path)
    pools = fortunes.language_pools(root, fortunes.LANGUAGE_DIRS)
    assert len(pools["it"]) == 6                               # not es/off/rude:
    assert len(pools["es"]) == 6 + 5 * len(fortunes.SPANISH_TOPIC_FILES)
    assert len(pools["cs"]) == 6                               # not cs/klasik-sk
    assert not any("Spruch" in q for q in pools["en"])         # the adams -> it/ link is skipped
    assert len(pools["en"]) == 6 * (len(fortunes.TOPIC_FILES) + len(fortunes.COLLECTION_FILES) + 1)


def test_emoji_reader(tmp_path):
    emojis = emoji.read_emoji_test(write_unicode(tmp_path) / emoji.EMOJI_TEST)
    names = [e.name for e in emojis]
    assert names.count("smiling face") == 1                    # the unqualified duplicate is skipped
    assert not any("skin tone" in n or n == "red hair" for n in names)
    assert emojis[0] == emoji.Emoji("grinning face", "Smileys & Emotion", "face-smiling")
    assert "flag: Germany" in names


def test_lazyload_reader_zlib_and_xz(r_roots):
    lib = r_roots.r_packages
    emma = rpackages.read_lazyload_object(lib, "janeaustenr", "emma")   # zlib chunks
    assert list(emma[:3]) == ["EMMA", "", "CHAPTER I"]
    frame = rpackages.read_lazyload_object(lib, "modeldata", "testing_data")   # xz chunks
    assert frame.shape == (10, 3) and frame["review"].tolist()[0].startswith("review 100")
    with pytest.raises(KeyError, match="no data object"):
        rpackages.read_lazyload_object(lib, "modeldata", "small_fine_foods")


def test_austen_paragraphs_drop_headings_and_short_lines():
    lines = ["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich, with a", "comfortable home.", "", "Short.", ""]
    assert rpackages.paragraphs(lines) == ["Emma Woodhouse, handsome, clever, and rich, with a comfortable home."]


# --- building -------------------------------------------------------------------------


def test_clean_text():
    assert td.clean_text("  a\tb\n\nc\x07 ") == "a b c"
    long = "word " * 100
    cut = td.clean_text(long, max_chars=23)
    assert cut == "word word word word" and len(cut) <= 23
    assert td.clean_text("x" * 50, max_chars=10) == "x" * 10


@pytest.mark.parametrize("counts,total,expected", [
    ([100, 100, 100], 60, [20, 20, 20]),
    ([5, 100, 100], 60, [5, 28, 27]),
    ([5, 6, 7], 60, [5, 6, 7]),
    ([50, 10, 50], 61, [26, 10, 25]),
])
def test_water_fill(counts, total, expected):
    assert td.water_fill(counts, total) == expected


def test_share_counts_follow_the_share():
    # 15, 15, 7.5, 0.5: the tie for the one rounded-up place goes to the earlier class,
    # and the last class still gets one text (every class is on every side).
    assert td.share_counts([90, 90, 45, 3], 1 / 6) == [15, 15, 8, 1]
    assert td.share_counts([1500, 300], 0.5) == [750, 150]
    assert td.share_counts([3, 3], 0.9, keep=2) == [1, 1]   # two texts stay for validation and train


@pytest.mark.parametrize("available,expected", [
    (5000, (1500, 500, 500)),   # enough: the asked sizes
    (2500, (1500, 500, 500)),
    (1536, (777, 259, 500)),    # emoji_group: test keeps 500, train and validation share the rest 3:1
    (1896, (1047, 349, 500)),   # wordnet_food
    (600, (225, 75, 300)),      # test would leave less than half: it takes half
])
def test_split_totals_keep_the_test_size_first(available, expected):
    got = td.split_totals(available, SplitSizes())
    assert got == expected and sum(got) == min(available, SplitSizes().total)


def test_three_splits_are_stratified_disjoint_and_sized(roots, tmp_path):
    sizes = SplitSizes(train=24, validation=8, test=16, min_per_class=4)   # 8 classes: 3 + 1 + 2 texts each
    task = td.load_task("fortune_lang", cache_dir=tmp_path, roots=roots, sizes=sizes)
    assert (len(task.train), len(task.validation), len(task.test)) == (24, 8, 16)
    assert task.split("validation") is task.validation
    texts = [{t for t, _ in task.split(s)} for s in td.SPLITS]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    for split in td.SPLITS:   # 8 balanced classes: each split holds the same number of each
        per_class = [sum(1 for _, y in task.split(split) if y == c) for c in range(8)]
        assert len(set(per_class)) == 1, (split, per_class)
    with pytest.raises(CmergeError, match="not 'dev'"):
        task.split("dev")
    with pytest.raises(ValueError, match="min_per_class must be >= 3"):
        SplitSizes(min_per_class=2)


def check_task(task, n_classes):
    assert len(task.labels) == len(task.descriptions) == n_classes
    for split in td.SPLITS:   # every class on every side
        assert {y for _, y in task.split(split)} == set(range(n_classes)), split
    texts = [{t for t, _ in task.split(split)} for split in td.SPLITS]
    assert [len(t) for t in texts] == [len(task.split(split)) for split in td.SPLITS]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]


def test_load_wordnet_noun_from_fixture(roots, tmp_path):
    task = td.load_task("wordnet_noun", cache_dir=tmp_path / "cache", roots=roots, sizes=SMALL)
    assert task.name == "wordnet_noun"
    assert task.labels == ["act", "animal", "food", "person"]   # classes with >= 4 texts, in table order
    assert task.descriptions[1] == wordnet.NOUN_CLASSES[1].description
    check_task(task, 4)
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 6, 8)


@pytest.mark.parametrize("name,n_classes", [
    ("wordnet_verb", 2), ("wordnet_domain", 2), ("wordnet_animal", 2), ("wordnet_food", 2),
    ("fortune_topic", len(fortunes.TOPIC_CLASSES)), ("fortune_topic_es", len(fortunes.SPANISH_TOPIC_CLASSES)),
    ("fortune_collection", len(fortunes.COLLECTION_CLASSES)),
    ("fortune_lang", 8), ("emoji_group", 3),
])
def test_other_tasks_build_from_fixtures(name, n_classes, roots, tmp_path):
    sizes = SplitSizes(train=48, validation=12, test=12, min_per_class=4)
    check_task(td.load_task(name, cache_dir=tmp_path / "cache", roots=roots, sizes=sizes), n_classes)


@pytest.mark.parametrize("name,labels", [
    ("austen_novel", [c.label for c in rpackages.AUSTEN_CLASSES]),
    ("food_sentiment", ["great", "other"]),
    ("word_pos", ["noun", "adjective"]),
])
def test_r_tasks_build_from_fixtures(name, labels, r_roots, tmp_path):
    task = td.load_task(name, cache_dir=tmp_path / "cache", roots=r_roots, sizes=SMALL)
    assert task.labels == labels
    check_task(task, len(labels))
    if name == "word_pos":   # a word tagged both adjective and adverb is dropped from both
        assert "fast" not in {t for t, _ in task.train + task.test}


def test_dedupe_is_case_insensitive_and_drops_cross_class_texts():
    recipe = dataclasses.replace(td.RECIPES["fortune_topic"], classes=fortunes.TOPIC_CLASSES[:2], min_chars=2)
    raw = {"computers": ["b2", "Same", "same ", "a1", "A1", "x"], "education": ["SAME", "b1", "b2"]}
    assert td.clean_pools(raw, recipe) == [["a1"], ["b1"]]


def test_build_is_deterministic(roots, tmp_path):
    a = td.load_task("fortune_lang", cache_dir=tmp_path / "a", roots=roots, sizes=SMALL)
    b = td.load_task("fortune_lang", cache_dir=tmp_path / "b", roots=roots, sizes=SMALL)
    assert a == b
    assert td.build_task(td.RECIPES["fortune_lang"], roots, SMALL) == a


def test_cache_is_read_back_and_keyed_by_recipe(roots, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    recipe = td.RECIPES["emoji_group"]
    first = td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL)
    [path] = cache.glob("emoji_group-*.json")
    assert json.loads(path.read_text(encoding="utf-8"))["labels"] == first.labels
    assert td.task_cache_path("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL) == path

    def fail(_):
        raise AssertionError("rebuilt although cached")
    monkeypatch.setitem(td.RECIPES, "emoji_group", dataclasses.replace(recipe, pools=fail))
    assert td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL) == first

    # A changed recipe is a different cache entry: a reworded description, ...
    reworded = tuple(c._replace(description=c.description + "!") for c in recipe.classes)
    monkeypatch.setitem(td.RECIPES, "emoji_group", dataclasses.replace(recipe, classes=reworded))
    assert td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL).descriptions[0].endswith("!")
    # ... a new version of the recipe's reader, or of the shared steps.
    monkeypatch.setitem(td.RECIPES, "emoji_group", dataclasses.replace(recipe, version=recipe.version + 1))
    td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL)
    monkeypatch.setattr(td, "DATA_RECIPE_VERSION", td.DATA_RECIPE_VERSION + 1)
    td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL)
    assert len(list(cache.glob("emoji_group-*.json"))) == 4


def test_torn_cache_file_is_rebuilt(roots, tmp_path):
    cache = tmp_path / "cache"
    task = td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL)
    [path] = cache.glob("*.json")
    path.write_text('{"name": "emoji_gr', encoding="utf-8")
    assert td.load_task("emoji_group", cache_dir=cache, roots=roots, sizes=SMALL) == task


def test_default_cache_dir_follows_cmerge_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CMERGE_CACHE", str(tmp_path))
    assert td.default_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("CMERGE_R_LIBRARY", raising=False)
    (tmp_path / td.R_LIBRARY_IN_CACHE).mkdir(parents=True)
    assert SourceRoots().r_packages == tmp_path / td.R_LIBRARY_IN_CACHE


# --- missing sources and bad names ------------------------------------------------------


def test_missing_source_names_the_package(tmp_path):
    empty = SourceRoots(wordnet=tmp_path, fortunes=tmp_path, unicode=tmp_path, r_packages=tmp_path)
    with pytest.raises(MissingSourceError, match="wordnet-base") as err:
        td.load_task("wordnet_noun", cache_dir=tmp_path / "cache", roots=empty)
    assert "setup_text_suite.sh" in str(err.value) and isinstance(err.value, CmergeError)
    with pytest.raises(MissingSourceError, match="r-cran-janeaustenr"):
        td.load_task("austen_novel", cache_dir=tmp_path / "cache", roots=empty)
    assert not (tmp_path / "cache").exists()
    missing = td.missing_sources(td.TASKS_8, roots=empty)
    assert missing[:2] == ["wordnet-base", "fortunes"]
    assert {"fortunes-de", "unicode-data", "r-cran-modeldata", "r-cran-tidytext"} <= set(missing)
    assert len(missing) == len(set(missing))


def test_no_missing_sources_with_fixtures(roots, r_roots):
    both = dataclasses.replace(roots, r_packages=r_roots.r_packages)
    assert td.missing_sources(td.TASKS_14, roots=both) == []


def test_unknown_task_lists_the_choices(roots):
    with pytest.raises(CmergeError, match="wordnet_noun"):
        td.load_task("wordnet_nouns", roots=roots)


def test_too_few_classes_is_a_clear_error(roots, tmp_path):
    with pytest.raises(CmergeError, match="fewer than 2 classes"):
        td.load_task("wordnet_noun", cache_dir=tmp_path, roots=roots, sizes=SplitSizes(min_per_class=50))


# --- the task lists ----------------------------------------------------------------------


def test_task_lists_and_recipes():
    assert len(td.TASKS_8) == len(set(td.TASKS_8)) == 8
    assert len(td.TASKS_14) == len(set(td.TASKS_14)) == 14
    assert td.TASKS_14[:8] == td.TASKS_8 and set(td.TASKS_14) <= set(td.RECIPES)
    assert len({r.seed for r in td.RECIPES.values()}) == len(td.RECIPES)
    for recipe in td.RECIPES.values():
        assert 2 <= len(recipe.classes) <= 20, recipe.name
        for field in ("key", "label", "description"):
            values = [getattr(c, field) for c in recipe.classes]
            assert len(set(values)) == len(values) and all(values), (recipe.name, field)
        assert recipe.requires, recipe.name


@pytest.mark.parametrize("name", ["emoji_group", "fortune_topic"])
def test_installed_sources_smoke(name, tmp_path):
    """On a machine with the Debian packages, the real task has the promised shape."""
    if td.missing_sources([name]):
        pytest.skip(f"{td.missing_sources([name])} not installed")
    task = td.load_task(name, cache_dir=tmp_path)
    assert 700 <= len(task.train) <= 1500 and 250 <= len(task.validation) <= 500 and len(task.test) == 500
    check_task(task, len(task.labels))


# --- one package list for the messages and the setup script -------------------------------

SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_text_suite.sh"


def test_one_package_list_behind_recipes_messages_and_the_setup_script(tmp_path):
    """The user report: the error message left out fortunes-min, which the setup script installs."""
    import subprocess

    from cmerge.suites.sources import packages

    required = {r.package for recipe in td.RECIPES.values() for r in recipe.requires}
    assert required == set(packages.ALL)   # every listed package is read by a task, and no other
    empty = SourceRoots(wordnet=tmp_path, fortunes=tmp_path, unicode=tmp_path, r_packages=tmp_path)
    assert set(td.missing_sources(td.TASKS_8, roots=empty)) == set(packages.ALL)   # fortune_lang reads fortunes-min
    listed = subprocess.run(["sh", str(SETUP_SCRIPT), "--list"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == list(packages.ALL)
    for kind, expected in (("apt", packages.APT), ("r", packages.R_DATA)):
        out = subprocess.run(["python3", packages.__file__, kind], capture_output=True, text=True, check=True)
        assert out.stdout.split() == list(expected)   # what the script installs, read by a plain python3


def test_fortune_lang_needs_fortunes_min(roots, tmp_path):
    (roots.fortunes / "fortunes").unlink()   # fortunes-min's main file: part of the English pool
    with pytest.raises(MissingSourceError, match="fortunes-min"):
        td.load_task("fortune_lang", cache_dir=tmp_path / "cache", roots=roots, sizes=SMALL)

"""Emoji names and their groups (Debian ``unicode-data``, ``/usr/share/unicode/emoji/emoji-test.txt``).

The file lists every emoji under ``# group: ...`` and ``# subgroup: ...`` headers, one
per line: ``code points ; status # emoji Eversion name``. Only fully-qualified entries
are read, and skin-tone variants are left out (they repeat a name with ``: light skin
tone`` appended), which leaves one line per distinct emoji. The text of an example is
the CLDR short name, e.g. ``grinning face with big eyes`` or ``flag: Germany``.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from cmerge.suites.sources import ClassSpec, Pools, packages

PACKAGE = packages.UNICODE
EMOJI_TEST = Path("emoji") / "emoji-test.txt"


class Emoji(NamedTuple):
    name: str
    group: str
    subgroup: str


def read_emoji_test(path: Path) -> list[Emoji]:
    """Every fully-qualified emoji without a skin-tone modifier, in file order."""
    group = subgroup = ""
    emoji = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif not line.startswith("#") and "; fully-qualified" in line and "#" in line:
            # "# 😀 E1.0 grinning face": the emoji, its version, then the name.
            parts = line.split("#", 1)[1].split(None, 2)
            if len(parts) == 3 and "skin tone" not in parts[2]:
                emoji.append(Emoji(parts[2].strip(), group, subgroup))
    return emoji


def group_pools(root: Path) -> Pools:
    """Emoji names filed under their group (``Smileys & Emotion``, ``Flags``, ...)."""
    pools: dict[str, list[str]] = defaultdict(list)
    for e in read_emoji_test(Path(root) / EMOJI_TEST):
        pools[e.group].append(e.name)
    return pools


# --- class tables -----------------------------------------------------------------

GROUP_CLASSES = (
    ClassSpec("Smileys & Emotion", "smileys", "the name of an emoji of a smiley face, a facial expression or a heart"),
    ClassSpec("People & Body", "people", "the name of an emoji of a person, a job, a gesture or a hand"),
    ClassSpec("Animals & Nature", "nature", "the name of an emoji of an animal, a plant or a flower"),
    ClassSpec("Food & Drink", "food", "the name of an emoji of food, a dish, a fruit or a drink"),
    ClassSpec("Travel & Places", "travel", "the name of an emoji of a vehicle, a building, the sky, the weather or a clock"),
    ClassSpec("Activities", "activities", "the name of an emoji of a sport, a game, a holiday or a celebration"),
    ClassSpec("Objects", "objects", "the name of an emoji of an everyday object: clothing, a tool, a device or office supplies"),
    ClassSpec("Symbols", "symbols", "the name of an emoji of a symbol: a sign, an arrow, a shape, a zodiac sign or a button"),
    ClassSpec("Flags", "flags", "the name of an emoji of the flag of a country"),
)

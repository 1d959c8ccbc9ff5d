"""The Debian packages the text suite reads: the one list behind the setup script and the error messages.

``scripts/setup_text_suite.sh`` installs what this module lists (it runs this file with
``python3``, so the module uses the standard library only and imports nothing from
cmerge), and :mod:`cmerge.suites.text_data` names the same packages when a source is
missing. A reader module in this folder takes its package names from here.

    python3 src/cmerge/suites/sources/packages.py apt   # the apt-installed data packages
    python3 src/cmerge/suites/sources/packages.py r     # the CRAN data packages (files only)
    python3 src/cmerge/suites/sources/packages.py all   # every Debian package name
"""
from __future__ import annotations

import sys

WORDNET = "wordnet-base"
FORTUNES = "fortunes"
FORTUNES_MIN = "fortunes-min"   # the files fortunes, literature and riddles
FORTUNES_TRANSLATED = {
    "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it", "ru": "fortunes-ru",
    "pl": "fortunes-pl", "cs": "fortunes-cs", "eo": "fortunes-eo",
}
UNICODE = "unicode-data"

APT = (WORDNET, FORTUNES, FORTUNES_MIN, *FORTUNES_TRANSLATED.values(), UNICODE)
"""Data packages installed with apt."""

R_DATA = ("janeaustenr", "modeldata", "tidytext")
"""CRAN data packages (Debian ``r-cran-<name>``), of which only the files are extracted: installing
them with apt would pull in R."""


def r_package(name: str) -> str:
    """The Debian name of a CRAN data package: ``r-cran-<name, lower case>``."""
    return f"r-cran-{name.lower()}"


ALL = APT + tuple(r_package(name) for name in R_DATA)
"""Every Debian package the suite reads, in the order the setup script installs them."""


if __name__ == "__main__":
    lists = {"apt": APT, "r": R_DATA, "all": ALL}
    if len(sys.argv) != 2 or sys.argv[1] not in lists:
        sys.exit(f"usage: python3 {sys.argv[0]} {'|'.join(lists)}")
    print(" ".join(lists[sys.argv[1]]))

"""cmerge: continual model merging — fold fine-tuned experts into one merged model as they arrive.

    from cmerge import Merger, init_state, open_state, merge, REGISTRY

The public names are imported on first use (torch loads with them), so ``import cmerge``
and the ``cmerge`` command's ``--help`` stay cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import CmergeError

__version__ = "0.1.0"

_EXPORTS = {
    "REGISTRY": "methods", "get_method": "methods",
    "Merger": "merger", "merge": "merger",
    "State": "state", "init_state": "state", "open_state": "state",
}

__all__ = ["CmergeError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

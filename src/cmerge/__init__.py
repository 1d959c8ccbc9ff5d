"""cmerge: continual model merging — fold fine-tuned experts into one model as they arrive."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import CmergeError  # noqa: E402
from .methods import REGISTRY, get_method  # noqa: E402
from .merger import Merger, merge  # noqa: E402
from .state import State, init_state, open_state  # noqa: E402

__all__ = ["CmergeError", "Merger", "REGISTRY", "State", "__version__", "get_method", "init_state", "merge",
           "open_state"]

"""The one registry of continual merging methods. The CLI flags and config keys come from it.

``REGISTRY`` maps each method's name to its class. A class is imported the first time it
is looked up (the method modules import torch), so knowing the names — ``name in
REGISTRY``, ``sorted(REGISTRY)`` — costs nothing; ``REGISTRY[name]``, ``.values()`` and
``.items()`` import what they return.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..errors import CmergeError

if TYPE_CHECKING:
    from .base import Method

# name -> "module:Class" in this package, in the order `cmerge methods` lists them
BUILT_IN = {
    "opcm": "opcm:OPCM", "average": "average:Average", "task_arithmetic": "task_arithmetic:TaskArithmetic",
    "ties": "ties:Ties", "magmax": "magmax:MagMax", "fisher_merge": "fisher_merge:FisherMerge", "ema": "ema:EMA",
    "dop": "dop:DOP", "nufilt": "nufilt:NUFILT", "iso": "iso:Isotropic", "opcm_ab": "opcm_ab:OPCMFactors", "slao": "slao:SLAO",
}


class Registry(Mapping[str, "type[Method]"]):
    """Method name → method class, each class imported when first looked up."""

    def __init__(self, where: Mapping[str, str]) -> None:
        self._where = dict(where)
        self._classes: dict[str, type[Method]] = {}

    def __getitem__(self, name: str) -> type[Method]:
        if name not in self._classes:
            module, attr = self._where[name].split(":")
            cls = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
            if cls.name != name:
                raise RuntimeError(f"the registry names {attr} {name!r}, but the class calls itself {cls.name!r}")
            self._classes[name] = cls
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def add(self, cls: type[Method]) -> None:
        self._where[cls.name] = f"{cls.__module__}:{cls.__qualname__}"
        self._classes[cls.name] = cls


REGISTRY = Registry(BUILT_IN)


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry (usable as a decorator)."""
    REGISTRY.add(cls)
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method class called ``name``; the one place an unknown name is refused."""
    if name not in REGISTRY:
        raise CmergeError(f"unknown method {name!r}; choose one of {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method with validated parameters (see :meth:`Method.parse_params`)."""
    return get_method_class(name)(**params)


_BASE_NAMES = ("Method", "Param", "TensorStep", "TensorUpdate")


def __getattr__(name: str) -> Any:
    if name not in _BASE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.base"), name)


__all__ = ["REGISTRY", "Method", "Param", "TensorStep", "TensorUpdate", "get_method", "get_method_class", "register"]

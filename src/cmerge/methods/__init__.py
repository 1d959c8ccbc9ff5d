"""The one registry of continual merging methods. The CLI flags and config keys come from it."""
from __future__ import annotations

from typing import Any

from ..errors import CmergeError
from .average import Average
from .base import Method, Param, TensorStep, TensorUpdate
from .dop import DOP
from .ema import EMA
from .fisher_merge import FisherMerge
from .magmax import MagMax
from .nufilt import NUFILT
from .opcm import OPCM
from .opcm_ab import OPCMFactors
from .slao import SLAO
from .task_arithmetic import TaskArithmetic
from .ties import Ties

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (OPCM, Average, TaskArithmetic, Ties, MagMax, FisherMerge, EMA, DOP, NUFILT, OPCMFactors, SLAO)}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry (usable as a decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    """The registered method class called ``name``; the one place an unknown name is refused."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CmergeError(f"unknown method {name!r}; choose one of {', '.join(sorted(REGISTRY))}.") from None


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method with validated parameters (see :meth:`Method.parse_params`)."""
    return get_method_class(name)(**params)


__all__ = ["REGISTRY", "Method", "Param", "TensorStep", "TensorUpdate", "get_method", "get_method_class", "register"]

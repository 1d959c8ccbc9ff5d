"""What every reader and writer agrees on: a tensor's shape and dtype, dtype names, byte sizes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CmergeError

#: safetensors dtype codes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
#: the floating dtypes a user may name (export dtype, precision)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CmergeError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.") from None


def torch_dtype(name: str) -> torch.dtype:
    """Any torch dtype by its name (as :func:`dtype_name` writes it)."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CmergeError(f"unknown dtype {name!r}.")
    return dt


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def rows_numel(meta: TensorMeta, rows: slice | None) -> int:
    """Elements in ``rows`` (a slice of the first dimension) of a tensor, or in all of it."""
    if rows is None or not meta.shape:
        return meta.numel
    return meta.numel // max(meta.shape[0], 1) * (rows.stop - rows.start)

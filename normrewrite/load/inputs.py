"""Example inputs: ``--input SHAPE[:dtype]`` specs, and reproducible random tensors for them.

Inputs are bounded before anything is allocated: a dimension must fit in 64 bits, and all example
inputs made together may take at most :data:`MAX_INPUT_BYTES` (2 GiB; ``--max-input-bytes`` /
:func:`input_limit` raise it). Over it is a :class:`~normrewrite.errors.UsageError`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from normrewrite.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}

_SHAPE = re.compile(r"^\d+(x\d+)*$")
MAX_INPUT_BYTES = 2 << 30
_MAX_DIM = 2**63 - 1
_limit: ContextVar[int] = ContextVar("max_input_bytes", default=MAX_INPUT_BYTES)


@contextlib.contextmanager
def input_limit(max_bytes: int) -> Iterator[None]:
    """Within the block, example inputs may take up to ``max_bytes`` in total."""
    token = _limit.set(max_bytes)
    try:
        yield
    finally:
        _limit.reset(token)


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None  # exclusive upper bound for integer inputs (e.g. a vocabulary size)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return f"{shape}:{str(self.dtype).removeprefix('torch.')}"

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        shape_s, _, dtype_s = text.strip().partition(":")
        shape_s = shape_s.strip().lower()
        if not _SHAPE.match(shape_s):
            raise UsageError(
                f"bad input spec {text!r}: expected SHAPE[:dtype] like 1x3x224x224 or 1x16:int64"
            )
        shape = tuple(int(d) for d in shape_s.split("x"))
        if any(d == 0 for d in shape):
            raise UsageError(f"bad input spec {text!r}: dimensions must be positive")
        if any(d > _MAX_DIM for d in shape):
            raise UsageError(f"bad input spec {text!r}: a dimension larger than 2**63-1")
        dtype = torch.float32
        if dtype_s:
            try:
                dtype = DTYPES[dtype_s.strip().lower()]
            except KeyError:
                raise UsageError(
                    f"bad input spec {text!r}: unknown dtype {dtype_s!r} "
                    f"(use one of {', '.join(sorted(set(DTYPES)))})"
                ) from None
        return cls(shape, dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (
            1 if self.dtype is torch.bool else torch.empty((), dtype=self.dtype).element_size()
        )

    @classmethod
    def of(cls, t: torch.Tensor) -> InputSpec:
        return cls(tuple(t.shape), t.dtype)

    def make(self, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.dtype.is_floating_point:
            t = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            return t.to(self.dtype).to(device)
        if self.dtype is torch.bool:
            return (torch.rand(self.shape, generator=generator) > 0.5).to(device)
        high = self.high or 10
        return torch.randint(0, high, self.shape, generator=generator, dtype=self.dtype).to(device)


def check_input_size(specs: Sequence[InputSpec], max_bytes: int | None = None) -> None:
    """Refuse example inputs over the limit (``max_bytes``, else the current :func:`input_limit`)."""
    limit = _limit.get() if max_bytes is None else max_bytes
    total = sum(s.nbytes for s in specs)
    if total > limit:
        shapes = ", ".join(map(str, specs))
        raise UsageError(
            f"example inputs {shapes} take {total} bytes, over the limit of {limit} "
            "(--max-input-bytes raises it)"
        )


def make_inputs(specs: Sequence[InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    check_input_size(specs)
    g = torch.Generator().manual_seed(seed)
    return tuple(s.make(g) for s in specs)


def as_tuple(example: Any) -> tuple[Any, ...]:
    """A factory's example inputs as a positional-argument tuple."""
    if isinstance(example, tuple):
        return example
    if isinstance(example, list):
        return tuple(example)
    return (example,)


def describe(inputs: Sequence[Any]) -> list[str]:
    return [str(InputSpec.of(t)) if isinstance(t, torch.Tensor) else repr(t) for t in inputs]

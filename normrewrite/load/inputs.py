"""Example inputs: ``--input SHAPE[:dtype]`` specs, and reproducible random tensors for them."""

from __future__ import annotations

import re
from collections.abc import Sequence
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


def make_inputs(specs: Sequence[InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
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

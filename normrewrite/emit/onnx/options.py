"""How ONNX is emitted: :class:`OnnxOptions` (``convert --opset/--onnx-target/--dynamic/--dtype/
--keep-io-types``) and the dtypes with their parity tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from normrewrite.errors import UsageError

if TYPE_CHECKING:
    from normrewrite.core.onnx_pass import Target

TWO_GB = 2**31 - 1  # protobuf's limit: initializers above it go to external data
DTYPES = ("float32", "float16", "bfloat16")
# parity tolerance (max |Δ| / max |y|) against the fp32 original, per emitted dtype
DTYPE_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


@dataclass(frozen=True)
class OnnxOptions:
    """How to emit ONNX (``convert --opset/--onnx-target/--dynamic/--dtype/--keep-io-types``)."""

    opset: int | None = None  # None: default_opset()
    target: Target = "standard"
    dynamic: bool = False  # symbolic batch / sequence / image dims, checked at other sizes
    dtype: str = "float32"
    keep_io_types: bool = False  # with dtype: keep fp32 graph inputs/outputs, cast inside
    external_data_threshold: int = TWO_GB

    def __post_init__(self) -> None:
        if self.target not in ("standard", "ort"):
            raise UsageError(f"--onnx-target must be standard or ort, not {self.target!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.opset is not None and not 7 <= self.opset <= 30:
            raise UsageError(f"--opset {self.opset} is not a valid ONNX opset")
        if self.keep_io_types and self.dtype == "float32":
            raise UsageError("--keep-io-types needs --dtype float16 or bfloat16")

    @property
    def resolved_opset(self) -> int:
        from normrewrite.core.onnx_graph import default_opset  # imports onnx_ir: only for ONNX

        return self.opset or default_opset()

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

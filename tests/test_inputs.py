"""``--input SHAPE[:dtype]`` specs and the reproducible example tensors made from them."""

from __future__ import annotations

import pytest
import torch

from normrewrite.errors import UsageError
from normrewrite.load.inputs import InputSpec, as_tuple, describe, make_inputs


@pytest.mark.parametrize(
    ("text", "shape", "dtype"),
    [
        ("1x3x224x224", (1, 3, 224, 224), torch.float32),
        ("1x16:int64", (1, 16), torch.int64),
        ("2X8:FP16", (2, 8), torch.float16),
        (" 4 : bf16 ", (4,), torch.bfloat16),
        ("3:bool", (3,), torch.bool),
        ("5:double", (5,), torch.float64),
    ],
)
def test_parse(text: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    spec = InputSpec.parse(text)
    assert spec.shape == shape and spec.dtype == dtype
    assert InputSpec.parse(str(spec)) == spec  # str round-trips


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected SHAPE"),
        ("1xAx3", "bad input spec '1xAx3'"),
        ("1x", "bad input spec"),
        ("x3", "bad input spec"),
        ("1,3", "bad input spec"),
        ("-1x3", "bad input spec"),
        ("1x0x3", "dimensions must be positive"),
        ("1x3:float7", "unknown dtype 'float7'"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        InputSpec.parse(text)


def test_make_is_reproducible_and_respects_dtype_and_range() -> None:
    specs = [
        InputSpec((2, 3)),
        InputSpec((1, 50), torch.int64, high=7),
        InputSpec((4,), torch.bool),
    ]
    a, b = make_inputs(specs, seed=3), make_inputs(specs, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(make_inputs(specs, seed=4)[0], a[0])
    assert [t.dtype for t in a] == [torch.float32, torch.int64, torch.bool]
    assert [tuple(t.shape) for t in a] == [(2, 3), (1, 50), (4,)]
    assert int(a[1].min()) >= 0 and int(a[1].max()) < 7
    half = make_inputs([InputSpec((8,), torch.float16)], seed=3)[0]
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_as_tuple_and_describe() -> None:
    x = torch.zeros(1, 2)
    assert as_tuple(x) == (x,) and as_tuple([x, x]) == (x, x) and as_tuple((x,)) == (x,)
    assert describe((x, torch.zeros(3, dtype=torch.int64), 5)) == ["1x2:float32", "3:int64", "5"]

"""Expressions in a .pt2 program's JSON: torch's deserializer evaluates symbolic sizes with
``sympy.sympify`` (Python ``eval``) and turns guards into Python code; any of these strings could
run code. Every one must match the strict grammar, whatever field it sits in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import MARKER, read_entries, refused, save_program, write_entries

from normrewrite.errors import LoadError
from normrewrite.load.pt2 import check_pt2
from normrewrite.load.safety import check_expression


def _payload(root: Path) -> str:
    return f"__import__('pathlib').Path({str(root / MARKER)!r}).touch() or 8"


def _expr(text: str) -> dict[str, Any]:
    return {"as_expr": {"expr_str": text, "hint": {"as_int": 2}}}


def _first_tensor(program: dict[str, Any]) -> dict[str, Any]:
    return next(iter(program["graph_module"]["graph"]["tensor_values"].values()))


def _sizes(p: dict[str, Any], text: str) -> None:
    _first_tensor(p)["sizes"][0] = _expr(text)


def _strides(p: dict[str, Any], text: str) -> None:
    _first_tensor(p)["strides"][0] = _expr(text)


def _offset(p: dict[str, Any], text: str) -> None:
    _first_tensor(p)["storage_offset"] = _expr(text)


def _range_key(p: dict[str, Any], text: str) -> None:
    p["range_constraints"][text] = {"min_val": 1, "max_val": 8}


def _guard(p: dict[str, Any], text: str) -> None:
    p["guards_code"] = [text]


def _sym_int_value(p: dict[str, Any], text: str) -> None:
    p["graph_module"]["graph"].setdefault("sym_int_values", {})["evil"] = _expr(text)


def _sym_bool_value(p: dict[str, Any], text: str) -> None:
    p["graph_module"]["graph"].setdefault("sym_bool_values", {})["evil"] = {
        "as_expr": {"expr_str": text}
    }


def _target(p: dict[str, Any], text: str) -> None:
    p["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"


MUTATIONS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "sizes": _sizes,
    "strides": _strides,
    "storage_offset": _offset,
    "range_constraints key": _range_key,
    "guards_code": _guard,
    "sym_int_values": _sym_int_value,
    "sym_bool_values": _sym_bool_value,
    "node target outside torch.ops": _target,
}


def _hostile(root: Path, mutate: Callable[[dict[str, Any], str], None], dynamic: bool) -> Path:
    src = save_program(root / "src.pt2", dynamic=dynamic)
    entries = read_entries(src)
    out = []
    for name, data in entries:
        if "/models/" in name and name.endswith(".json"):
            program = json.loads(data)
            mutate(program, _payload(root))
            data = json.dumps(program).encode()
        out.append((name, data))
    src.unlink()
    return write_entries(root / "evil.pt2", out)


@pytest.mark.parametrize("field", list(MUTATIONS))
def test_expression_in_any_field_is_refused(tmp_path: Path, field: str) -> None:
    evil = _hostile(tmp_path, MUTATIONS[field], dynamic=field == "range_constraints key")
    line = refused(tmp_path, "convert", str(evil), "-o", str(tmp_path / "out.pt2"))
    assert "evil.pt2" in line
    with pytest.raises(LoadError):
        check_pt2(evil)


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s31', positive=True, integer=True)",
        "Mul(Integer(2), Symbol('s77', positive=True, integer=True))",
        "s0 + 8",
        "FloorDiv(s0, 2) * Max(u3, 1) - Mod(s1, 4) // 2 % 3",
        "CeilToInt(IntTrueDiv(s0, 3))",
        "StrictLessThan(Integer(1), Symbol('s0', integer=True))",
        "-oo",
    ],
)
def test_what_torch_writes_is_accepted(text: str) -> None:
    check_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "s0.__class__",
        "Symbol('s0').__init__",
        "(lambda: 1)()",
        "[s0 for s0 in ()]",
        "Symbol('__import__')",
        "eval('1')",
        "s0[0]",
        "Integer(1) ^ Integer(2)",
        "Symbol(name='s0', evil=exec)",
        "s0 if s1 else s2",
        "",
    ],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(LoadError):
        check_expression(text)


def test_real_dynamic_programs_pass(tmp_path: Path) -> None:
    check_pt2(save_program(tmp_path / "dyn.pt2", dynamic=True))

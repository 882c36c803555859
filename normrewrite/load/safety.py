"""Generic checks that make loading untrusted model files safe: nothing outside the model's
directory is read, no declared size is trusted before it is checked. (The ``.pt2`` vetting lives
with the ``.pt2`` loader in :mod:`normrewrite.load.pt2`.)

* :func:`check_expression`, :func:`check_guard`, :func:`check_target` — the strings of a
  serialized ``torch.export`` program that torch evaluates as code (sympy expressions through
  ``eval``, guards through ``exec``, node targets through attribute lookup) must match a strict
  grammar, checked on Python's syntax tree (:mod:`ast`) and never evaluated.

* :func:`check_external_data` — an ONNX model's external-data ``location`` must name a regular
  file inside the model's directory: no absolute paths, no ``..``, no symbolic links on the way,
  and ``offset + length`` within the file.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from normrewrite.errors import LoadError

# --------------------------------------------------------------------------- shape expressions

MAX_EXPR = 10_000  # characters in one expression

# What torch's serializer writes (``sympy.srepr`` of shape expressions, or their ``str``): the
# sympy classes srepr names and the functions the deserializer puts in sympify's namespace.
_FUNCTIONS = frozenset(
    {
        # torch.utils._sympy.functions, as listed in torch/_export/serde/serialize.py
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        # sympy classes in srepr output
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
    }
)
_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo"})
_ASSUMPTIONS = frozenset(
    {
        "integer",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "nonzero",
        "zero",
        "real",
        "finite",
        "infinite",
        "rational",
        "irrational",
        "even",
        "odd",
        "extended_real",
        "commutative",
        "complex",
        "prime",
        "composite",
        "extended_positive",
        "extended_negative",
        "extended_nonnegative",
        "extended_nonpositive",
        "extended_nonzero",
    }
)
SYMBOL = re.compile(r"^[a-z]{1,4}_?\d{1,9}$")  # s0, u3, zuf0, ps1
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_CMPOPS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_TARGET = re.compile(
    r"^(torch\.ops\.[A-Za-z_]\w*\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?"
    r"|_operator\.(add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|getitem|eq|ne|lt|le|gt|ge"
    r"|and_|or_|xor|not_|invert|lshift|rshift|matmul)"
    r"|math\.(ceil|floor|trunc|sqrt|exp|log|sin|cos|tan|tanh|isnan|isinf|isfinite)"
    r"|torch\._?sym_[a-z_]+|torch\._assert\w*|#[A-Za-z_]\w*:[\w.:]+)$"
)
_GUARD_NAMES = frozenset({"L", "Max", "Min", "FloorDiv", "Mod", "CeilToInt", "FloorToInt"})
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_SYNTAX = (
    ast.Subscript,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.USub,
    ast.UAdd,
    *_CMPOPS,
    *_BINOPS,
)


def _parse(text: Any, what: str) -> ast.Expression:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_EXPR:
        raise LoadError(f"{what} {str(text)[:60]!r} is not a shape expression")
    try:
        return ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise LoadError(f"{what} {text[:60]!r} is not a shape expression") from None


def check_expression(text: Any) -> None:
    """Refuse (:class:`LoadError`) a symbolic expression outside the grammar torch writes:
    symbols (``s0``, ``u3``), numbers, ``+ - * // %``, comparisons, and calls of the sympy and
    torch functions in ``_FUNCTIONS``. Checked on the syntax tree; nothing is evaluated."""
    tree = _parse(text, "expression")
    bad = _bad_expr(tree.body)
    if bad:
        raise LoadError(f"expression {text[:60]!r} is not a shape expression ({bad})")


def _bad_expr(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant):
        ok = isinstance(node.value, int | float) and not isinstance(node.value, complex)
        return None if ok else f"literal {node.value!r}"
    if isinstance(node, ast.Name):
        ok = node.id in _CONSTANTS or SYMBOL.match(node.id)
        return None if ok else f"name {node.id!r}"
    if isinstance(node, ast.UnaryOp):
        return _bad_expr(node.operand) if isinstance(node.op, ast.USub | ast.UAdd) else "operator"
    if isinstance(node, ast.BinOp):
        if not isinstance(node.op, _BINOPS):
            return f"operator {type(node.op).__name__}"
        return _bad_expr(node.left) or _bad_expr(node.right)
    if isinstance(node, ast.Compare):
        if not all(isinstance(op, _CMPOPS) for op in node.ops):
            return "comparison"
        return next((b for b in map(_bad_expr, [node.left, *node.comparators]) if b), None)
    if isinstance(node, ast.Call):
        return _bad_call(node)
    return f"{type(node).__name__} syntax"


def _bad_call(node: ast.Call) -> str | None:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        return f"call of {ast.unparse(node.func)[:30]!r}"
    name, args = node.func.id, list(node.args)
    if name in ("Symbol", "Float"):  # a string argument: a symbol name / a decimal number
        pattern = SYMBOL if name == "Symbol" else _NUMBER
        if (
            len(args) != 1
            or not isinstance(args[0], ast.Constant)
            or not isinstance(args[0].value, str)
            or not pattern.match(args[0].value)
        ):
            return f"{name} argument"
        args = []
        allowed = _ASSUMPTIONS if name == "Symbol" else frozenset({"precision"})
        for kw in node.keywords:
            value = kw.value.value if isinstance(kw.value, ast.Constant) else None
            if kw.arg not in allowed or type(value) not in (bool, int):
                return f"{name} keyword {kw.arg!r}"
    elif node.keywords:
        return f"keyword in {name}"
    return next((b for b in map(_bad_expr, args) if b), None)


def check_guard(text: Any) -> None:
    """Refuse a ``guards_code`` entry (Python source torch ``exec``-s) outside the guard grammar:
    ``L['x'].size()[0] <= 64``-style tests on input sizes, arithmetic, comparisons, ``and``/
    ``or``/``not`` and the shape functions."""
    tree = _parse(text, "guard")
    for node in ast.walk(tree.body):
        bad = None
        if isinstance(node, ast.Name):
            bad = None if node.id in _GUARD_NAMES else f"name {node.id!r}"
        elif isinstance(node, ast.Attribute):
            bad = None if node.attr in _GUARD_METHODS else f"attribute {node.attr!r}"
        elif isinstance(node, ast.Call):
            func = node.func
            ok = (isinstance(func, ast.Attribute) and func.attr in _GUARD_METHODS) or (
                isinstance(func, ast.Name) and func.id in _GUARD_NAMES - {"L"}
            )
            bad = None if ok and not node.keywords else "call"
        elif isinstance(node, ast.Constant):
            bad = None if isinstance(node.value, int | float | str) else "literal"
        elif isinstance(node, ast.BinOp):
            bad = None if isinstance(node.op, _BINOPS) else "operator"
        elif not isinstance(node, _GUARD_SYNTAX):
            bad = f"{type(node).__name__} syntax"
        if bad:
            raise LoadError(f"guard {text[:60]!r} is not a shape guard ({bad})")


def check_target(value: Any) -> None:
    """Refuse a graph node target that is not an operator (``torch.ops.*``, arithmetic)."""
    if not isinstance(value, str) or not _TARGET.match(value):
        raise LoadError(f"node target {str(value)[:60]!r} is not an operator")


# --------------------------------------------------------------------------- ONNX external data


def _onnx_tensors(graph: Any) -> list[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers, constant attributes,
    recursively through subgraphs."""
    from onnx import AttributeProto

    out = list(graph.initializer)
    for sp in graph.sparse_initializer:
        out += [sp.values, sp.indices]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                out.append(attr.t)
            elif attr.type == AttributeProto.TENSORS:
                out += list(attr.tensors)
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                out += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
            elif attr.type == AttributeProto.GRAPH:
                out += _onnx_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out += _onnx_tensors(g)
    return out


def _external_fields(tensor: Any) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def check_location(base: Path, location: str) -> Path:
    """The file an external-data ``location`` names, if it is a regular file inside ``base``
    reached without symbolic links; else :class:`LoadError`."""
    if not location:
        raise LoadError("external data without a location")
    if "\x00" in location:
        raise LoadError(f"external data location {location!r} contains a NUL byte")
    posix, win = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or win.is_absolute() or win.drive or location.startswith(("/", "\\")):
        raise LoadError(f"external data location {location!r} is an absolute path")
    parts = [q for q in location.replace("\\", "/").split("/") if q not in ("", ".")]
    if ".." in parts:
        raise LoadError(f"external data location {location!r} leaves the model's directory (..)")
    if not parts:
        raise LoadError(f"external data location {location!r} names no file")
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise LoadError(
                f"external data location {location!r} goes through a symbolic link ({current.name})"
            )
    try:
        real, root = current.resolve(strict=True), base.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise LoadError(f"external data file {location!r} does not exist next to the model") from e
    if root not in real.parents:
        raise LoadError(
            f"external data location {location!r} resolves outside the model's directory"
        )
    if not real.is_file():
        raise LoadError(f"external data location {location!r} is not a regular file")
    return real


def parse_onnx(p: Path) -> Any:
    """The ``ModelProto`` of ``p`` without its external data; one-line error if it does not parse."""
    import onnx

    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise LoadError(
            f"{p}: cannot parse the ONNX model (truncated or corrupt?): {type(e).__name__}"
        ) from e


def check_external_data(model_path: str | os.PathLike[str], proto: Any = None) -> list[Path]:
    """Validate every external-data reference of an ONNX model before anything reads it.

    Returns the files the model's tensors live in (inside its directory). Raises
    :class:`LoadError` naming the first offending tensor: a location that escapes the model's
    directory (absolute, ``..``, a symbolic link), a missing file, or an ``offset``/``length``
    beyond the file's end."""
    p = Path(model_path)
    if proto is None:  # ``proto``: the model already parsed (without its external data)
        proto = parse_onnx(p)
    base = p.parent if str(p.parent) else Path(".")
    graphs = [proto.graph] + [f for f in proto.functions]
    tensors: list[Any] = []
    for g in graphs:
        if hasattr(g, "initializer"):
            tensors += _onnx_tensors(g)
        else:  # FunctionProto: constants in its nodes
            from onnx import helper

            tensors += _onnx_tensors(helper.make_graph(list(g.node), "f", [], []))
    files: dict[Path, None] = {}
    for t in tensors:
        fields = _external_fields(t)
        if fields is None:
            continue
        where = f"{p}: tensor {t.name!r}"
        try:
            real = check_location(base, fields.get("location", ""))
        except LoadError as e:
            raise LoadError(f"{where}: {e}") from None
        try:
            offset = int(fields.get("offset", "0") or 0)
            length = int(fields["length"]) if fields.get("length") not in (None, "") else None
        except ValueError:
            raise LoadError(f"{where}: bad external data offset/length {fields}") from None
        size = real.stat().st_size
        if offset < 0 or (length is not None and length < 0):
            raise LoadError(f"{where}: negative external data offset/length")
        end = offset + (length if length is not None else 0)
        if offset > size or end > size:
            raise LoadError(
                f"{where}: external data [{offset}, {end}) lies beyond the end of "
                f"{fields.get('location')} ({size} bytes)"
            )
        files[real] = None
    return list(files)


__all__ = [
    "SYMBOL",
    "check_expression",
    "check_external_data",
    "check_guard",
    "check_location",
    "check_target",
]

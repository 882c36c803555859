"""What ``normrewrite passes NAME`` shows: a pass's summary, exactness, what it matches, and each
option with its CLI name, type, default and meaning.

An option's meaning is the attribute docstring under its field in the pass's ``Options``
dataclass (the string literal right after ``name: type = default``), read from the class source
with :mod:`ast` — the convention every pass already follows, so the help and the code cannot
drift apart. What a pass matches, its identity and preconditions are its module docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import itertools
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

from normrewrite.core.pass_infra import Pass, option_name


@dataclass(frozen=True)
class OptionHelp:
    name: str  # as users type it
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class PassHelp:
    name: str
    summary: str
    exact: bool
    description: str  # identity, what it matches, preconditions
    options: tuple[OptionHelp, ...]


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name → the string literal that follows the field in ``cls``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next((n.body for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)), [])
    docs: dict[str, str] = {}
    for field, doc in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = inspect.cleandoc(doc.value.value)
    return docs


def type_name(typ: Any) -> str:
    """A type as a user reads it: ``int``, ``skip|clone``, ``float or none``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        named = " or ".join(type_name(a) for a in args)
        return f"{named} or none" if len(args) < len(typing.get_args(typ)) else named
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(typ)))
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return "|".join(str(m.value) for m in typ)
    if typ is bool:
        return "bool (true/false)"
    return getattr(typ, "__name__", str(typ))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value.value if isinstance(value, enum.Enum) else value)


def _plain(text: str) -> str:
    """reST markup to plain text: ``x`` → `x`, :func:`a.b` → a.b."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


def options_help(options: type) -> tuple[OptionHelp, ...]:
    hints = typing.get_type_hints(options)
    docs = attribute_docs(options)
    return tuple(
        OptionHelp(
            option_name(f), type_name(hints[f.name]), _default(f), _plain(docs.get(f.name, ""))
        )
        for f in dataclasses.fields(options)
    )


def pass_help(cls: type[Pass]) -> PassHelp:
    module = sys.modules.get(cls.__module__)
    doc = inspect.cleandoc(module.__doc__ or "") if module else ""
    return PassHelp(cls.name, cls.summary, cls.exact, _plain(doc), options_help(cls.Options))


__all__ = ["OptionHelp", "PassHelp", "attribute_docs", "options_help", "pass_help", "type_name"]

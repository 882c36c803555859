"""The pytree specs of a ``.pt2`` program: which container types its inputs and outputs use, and
stand-ins for the ones this process does not know, so a program loads without its model's code.

``torch.export.load`` rebuilds a program's input/output spec from type names
(``transformers.modeling_outputs.BaseModelOutput``) that must be registered with torch's pytree
in the loading process — normally by importing the model's library. normrewrite never imports
it: :func:`register_stand_ins` registers a generic dict-like :class:`StandIn` under each unknown
name instead, with the spec's field names.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from normrewrite.errors import LoadError, first_line

# the output names of a program normrewrite wrote (normrewrite.emit.write_pt2), in its archive,
# and where load_pt2 leaves them for the next export (normrewrite.emit.export_program)
OUTPUTS_FILE = "normrewrite/outputs.json"
OUTPUT_NAMES_META = "normrewrite.output_names"


def output_names_of(text: str, count: int) -> tuple[str, ...] | None:
    """The output names in an archive's ``normrewrite/outputs.json`` when they describe its
    ``count`` flat outputs (else None: absent, malformed, or classes kept)."""
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    names = data.get("outputs") if isinstance(data, dict) and data.get("flattened") else None
    if not isinstance(names, list) or len(names) != count:
        return None
    if not all(isinstance(n, str) and len(n) <= 1000 for n in names):
        return None
    return tuple(names)


def spec_types(spec: str) -> set[str]:
    """The type names of a serialized pytree spec (``[protocol, {"type", "context",
    "children_spec"}]``). A context naming an enum (``"__enum__"``) is refused: torch's decoder
    imports the module it names."""
    try:
        tree = json.loads(spec)
    except ValueError as e:
        raise LoadError(f"a pytree spec is not valid JSON ({first_line(e)})") from None
    nodes = tree[1:] if isinstance(tree, list) else []
    types: set[str] = set()
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            raise LoadError("a pytree spec node is not an object")
        if isinstance(node.get("type"), str):
            types.add(node["type"])
        context = node.get("context")
        if isinstance(context, str) and "__enum__" in context:
            raise LoadError("a pytree spec context names an enum (torch imports its module)")
        children = node.get("children_spec", [])
        nodes.extend(children if isinstance(children, list) else [children])
    return types


class StandIn(dict[str, Any]):
    """A container a program's spec names but this process does not know (e.g. a
    ``transformers`` output class of a ``.pt2`` written with ``--keep-output-classes``): a dict
    of its fields (also readable as attributes), rebuilt from the spec without the class's code.
    Its pytree node keeps the spec's context, so the program re-exports with the same spec."""

    serialized_type_name: str = ""
    context: Any = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _keys(context: Any, n: int) -> list[Any]:
    named = isinstance(context, list) and len(context) == n
    return list(context) if named and all(isinstance(k, str) for k in context) else list(range(n))


def _stand_in_flatten(obj: StandIn) -> tuple[list[Any], Any]:
    return list(obj.values()), obj.context


def _stand_in_flatten_with_keys(obj: StandIn) -> tuple[list[tuple[Any, Any]], Any]:
    from torch.utils._pytree import MappingKey, SequenceKey

    key = (lambda k: MappingKey(k)) if isinstance(obj.context, list) else SequenceKey
    return [(key(k), v) for k, v in obj.items()], obj.context


def _stand_in_unflatten(cls: type[StandIn], values: Any, context: Any) -> StandIn:
    values = list(values)
    obj = cls(zip(_keys(context, len(values)), values, strict=True))
    obj.context = context
    return obj


_SAFE_NAME = re.compile(r"[A-Za-z_]\w{0,99}")


def register_stand_ins(types: set[str]) -> list[str]:
    """Register a :class:`StandIn` subclass under each type name torch's pytree does not know
    (``torch.utils._pytree.register_pytree_node(..., serialized_type_name=NAME)``), so that
    ``torch.export.load`` can rebuild the spec. The named module is never imported: code of a
    model that may not even be installed is not run. A later import of the real class replaces
    the stand-in for programs loaded after it. Returns the names registered."""
    from torch.utils import _pytree as pytree

    done = []
    for name in sorted(types - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        tail = name.rsplit(".", 1)[-1]
        cls_name = tail if _SAFE_NAME.fullmatch(tail) else "StandIn"
        cls = type(cls_name, (StandIn,), {"__module__": __name__, "serialized_type_name": name})
        pytree.register_pytree_node(
            cls,
            _stand_in_flatten,
            functools.partial(_stand_in_unflatten, cls),
            serialized_type_name=name,
            flatten_with_keys_fn=_stand_in_flatten_with_keys,
        )
        done.append(name)
    return done


__all__ = [
    "OUTPUTS_FILE",
    "OUTPUT_NAMES_META",
    "StandIn",
    "output_names_of",
    "register_stand_ins",
    "spec_types",
]

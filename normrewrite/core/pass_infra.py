"""Pass infrastructure: the base class every pass derives from, its result, and the manager.

A pass is a class with one method, ``call(gm, ctx) -> PassResult``. ``Pass.__call__`` runs the
pass's precondition check (``requires``), the pass itself, then the postconditions on its
*output* (``ensures``: by default a lint of the graph and a recompile). Passes are **in place**:
they edit the GraphModule they are given and return it; callers that need the original keep a copy
(:func:`normrewrite.convert` does). Options are a frozen dataclass per pass, parsed from the
CLI's ``-p name:key=value`` strings with their declared types; an option is named as users type it
(:func:`option_name`) in every message. :mod:`normrewrite.core.pass_help` documents them.

Graph rewrites follow one match protocol on top of :class:`Pass`: see :mod:`normrewrite.core.rewrite`.
"""

from __future__ import annotations

import dataclasses
import enum
import pkgutil
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch
from torch.fx import GraphModule

from normrewrite.errors import PassError, UsageError

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Change:
    """One rewrite a pass made: where (a module path or node name) and what."""

    target: str
    detail: str


@dataclass(frozen=True)
class Skip:
    """A candidate the pass looked at and left alone, with the reason."""

    target: str
    reason: str


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorRecipe:
    """How stored tensors were rewritten: ``outputs = fn(*inputs)``, all named by FQN at the time
    the pass ran. Passes edit weights through :func:`compute_tensors`, which applies the recipe
    and logs it in :attr:`PassContext.recipes`; a model traced on the ``meta`` device can then be
    converted by replaying the log tensor by tensor from its checkpoint, never holding it whole."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]]
    origin: str = ""  # the pass that wrote it


@dataclass
class PassContext:
    """What a pass may need beyond the graph: example inputs (for passes that measure or train),
    the original model (for distillation), a random seed, and the log of tensor rewrites."""

    example_inputs: tuple[Any, ...] = ()
    reference: torch.nn.Module | None = None
    seed: int = 0
    warn: Callable[[str], None] = lambda msg: None
    recipes: list[TensorRecipe] = field(default_factory=list)


def compute_tensors(
    gm: torch.nn.Module,
    ctx: PassContext,
    outputs: Sequence[str],
    inputs: Sequence[str],
    fn: Callable[..., tuple[torch.Tensor, ...]],
    origin: str = "",
) -> None:
    """Set the stored tensors ``outputs`` to ``fn(*inputs)`` (FQNs on ``gm``) and log the recipe.

    ``fn`` must be a pure function of its tensor arguments (it is replayed on real data when the
    pass ran on ``meta`` tensors). Outputs that do not exist yet are created as parameters."""
    from normrewrite.core.graph import get_tensor, set_tensor

    values = fn(*(get_tensor(gm, name) for name in inputs))
    if isinstance(values, torch.Tensor):
        values = (values,)
    if len(values) != len(outputs):
        raise PassError(
            f"tensor recipe from {origin or 'a pass'} returned {len(values)} tensors for {len(outputs)} names"
        )
    for name, value in zip(outputs, values, strict=True):
        set_tensor(gm, name, value)
    ctx.recipes.append(TensorRecipe(tuple(outputs), tuple(inputs), fn, origin))


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class NoOptions:
    pass


def option_name(f: dataclasses.Field[Any]) -> str:
    """An option as users type it: the field name without the trailing ``_`` that keeps a Python
    keyword usable as a field (``from_`` → ``from``)."""
    return f.name.rstrip("_") or f.name


def option_fields(options: type) -> dict[str, dataclasses.Field[Any]]:
    """CLI name → field of an Options dataclass."""
    return {option_name(f): f for f in dataclasses.fields(options)}


def _field_for(options: type, key: str) -> dataclasses.Field[Any] | None:
    """The field ``key`` names, as users type it (``from``) or as the field is named (``from_``)."""
    fields = option_fields(options)
    return fields.get(key) or next((f for f in fields.values() if f.name == key), None)


def _unknown(pass_name: str, key: str, options: type) -> UsageError:
    names = sorted(option_fields(options))
    return UsageError(
        f"pass {pass_name}: unknown option {key!r}"
        + (f" (options: {', '.join(names)})" if names else " (it takes none)")
    )


def _convert(value: str, typ: Any, key: str, pass_name: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "") and len(args) < len(typing.get_args(typ)):
            return None
        if len(args) == 1:
            return _convert(value, args[0], key, pass_name)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise UsageError(
                f"pass {pass_name}: option {key}={value!r} is not one of {', '.join(map(str, choices))}"
            )
        return value
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            if value not in {str(m.value) for m in typ}:
                choices = ", ".join(str(m.value) for m in typ)
                raise UsageError(
                    f"pass {pass_name}: option {key}={value!r} is not one of {choices}"
                )
            return next(m for m in typ if str(m.value) == value)
        if typ in (int, float, str):
            return typ(value)
    except ValueError:
        raise UsageError(
            f"pass {pass_name}: option {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}"
        ) from None
    raise UsageError(f"pass {pass_name}: option {key} has an unsupported type {typ}")


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` → ``("name", {"key": "value", ...})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"empty pass name in {spec!r}")
    opts: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"pass option {item!r} in {spec!r} is not key=value")
            opts[key.strip()] = value.strip()
    return name, opts


# --------------------------------------------------------------------------- the pass


class NamedPass:
    """What every registered pass has, whatever graph form it rewrites (torch.fx: :class:`Pass`;
    ONNX: :class:`normrewrite.core.onnx_pass.OnnxPass`). Subclasses set ``name`` (the CLI name),
    ``summary`` (one line), ``exact`` (does the pass preserve the model's function up to float
    rounding?) and ``Options`` (a frozen dataclass, parsed from ``-p name:key=value``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    # the same rewrite for ONNX models, registered under the same name (see normrewrite.passes),
    # as "module:Class": imported only when an ONNX model needs it (it imports onnx_ir/onnxscript)
    onnx_form: ClassVar[str | None] = None

    def __init__(self, options: Any | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise UsageError(f"pass {self.name}: give options or keyword arguments, not both")
        if options is None:
            values = {}
            for key, value in kwargs.items():
                f = _field_for(self.Options, key)
                if f is None:
                    raise _unknown(self.name, key, self.Options)
                values[f.name] = value
            options = self.Options(**values)
        self.options = options
        self.validate_options()

    @classmethod
    def from_strings(cls, opts: dict[str, str]) -> Self:
        hints = typing.get_type_hints(cls.Options)
        values: dict[str, Any] = {}
        for key, raw in opts.items():
            f = _field_for(cls.Options, key)
            if f is None:
                raise _unknown(cls.name, key, cls.Options)
            values[f.name] = _convert(raw, hints[f.name], option_name(f), cls.name)
        return cls(**values)

    def validate_options(self) -> None:
        """Reject impossible option combinations with a :class:`UsageError`."""

    def describe(self) -> str:
        opts = {
            option_name(f): getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != f.default
        }
        if not opts:
            return self.name
        shown = {k: v.value if isinstance(v, enum.Enum) else v for k, v in opts.items()}
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in shown.items())

    def __repr__(self) -> str:
        return f"<Pass {self.describe()}>"


class Pass(NamedPass):
    """Base class of the torch.fx passes: implement :meth:`call`."""

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        """Precondition on the input graph; raise :class:`PassError` when it does not hold."""

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        """Postcondition on the output: the graph is well formed and its code is current."""
        gm = result.graph_module
        try:
            gm.graph.lint()
        except Exception as e:  # a bug in the pass, reported as such
            raise PassError(f"pass {self.name} produced an invalid graph: {e}") from e
        gm.recompile()

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        """For ``inspect``: node name → what this pass would do there (or why it would not).
        Must not modify ``gm``."""
        return {}

    def __call__(self, gm: GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        self.ensures(result)
        return result


# --------------------------------------------------------------------------- registry


P = TypeVar("P", bound=NamedPass)


class PassRegistry(Generic[P]):
    """Name → pass class, built from explicit imports (see ``normrewrite.passes``); one registry
    per graph form (torch passes, ONNX passes). ``lazy`` registers passes by name as
    ``"module:Class"`` (:func:`pkgutil.resolve_name`), imported when first looked up or iterated:
    the ONNX forms import onnx_ir/onnxscript, which a torch-only conversion never needs."""

    def __init__(
        self, passes: Sequence[type[P]] = (), *, lazy: Mapping[str, str] | None = None
    ) -> None:
        self._by_name: dict[str, type[P] | str] = {}
        for name, entry in [*((p.name, p) for p in passes), *(lazy or {}).items()]:
            if name in self._by_name:
                raise ValueError(f"two passes named {name}")
            self._by_name[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[type[P]]:
        return iter([self.get(name) for name in self._by_name])

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> type[P]:
        try:
            entry = self._by_name[name]
        except KeyError:
            raise UsageError(
                f"unknown pass {name!r} (available: {', '.join(self._by_name)})"
            ) from None
        if isinstance(entry, str):
            entry = pkgutil.resolve_name(entry)
            if entry.name != name:
                raise ValueError(f"{self._by_name[name]} is named {entry.name!r}, not {name!r}")
            self._by_name[name] = entry
        return entry

    def create(self, spec: str | P) -> P:
        if not isinstance(spec, str):
            return spec
        name, opts = parse_pass_spec(spec)
        return self.get(name).from_strings(opts)


# --------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class PassRun:
    pass_: Pass
    result: PassResult
    seconds: float


@dataclass
class PipelineResult:
    graph_module: GraphModule
    runs: list[PassRun]

    @property
    def modified(self) -> bool:
        return any(r.result.modified for r in self.runs)

    @property
    def exact(self) -> bool:
        return all(r.pass_.exact for r in self.runs if r.result.modified)


class PassManager:
    """Runs passes in order.

    ``verify_each`` is called after every pass that changed the graph (e.g. a numeric check, the
    ``--verify-each`` flag); ``after_change`` likewise (``--print-after-change``).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: Callable[[Pass, PassResult], None] | None = None,
        after_change: Callable[[Pass, PassResult], None] | None = None,
        before_pass: Callable[[Pass], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.after_change = after_change
        self.before_pass = before_pass

    def __call__(self, gm: GraphModule, ctx: PassContext | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        runs: list[PassRun] = []
        for p in self.passes:
            if self.before_pass:
                self.before_pass(p)
            start = time.perf_counter()
            result = p(gm, ctx)
            runs.append(PassRun(p, result, time.perf_counter() - start))
            gm = result.graph_module
            if result.modified:
                if self.after_change:
                    self.after_change(p, result)
                if self.verify_each:
                    self.verify_each(p, result)
        return PipelineResult(gm, runs)

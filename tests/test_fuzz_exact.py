"""Property-based exactness of every exact pass: random layer configurations and statistics.

Harness: a strategy draws an :class:`ExactCase` (a small model in some dtype, inputs, the passes
to run and how many rewrites they must make); :func:`check_exact` traces it with the given tracer,
runs the passes on the traced graph, and compares the rewritten model against an **fp64 run of the
original** with a principled tolerance:

* the rewrite must be about as accurate as the original model in its own dtype:
  ``err_new ≤ 8·err_orig + 16·u·scale`` where ``err_orig`` is the original model's own error in
  that dtype against fp64, ``u`` the dtype's unit roundoff and ``scale`` the largest fp64 output
  magnitude;
* for float64 models, the fp32 error of the original measures how ill-conditioned the case is, and
  the fp64 rewrite must be within ``64·(u64/u32)·err32 + 64·u64·scale`` — the same accuracy,
  scaled to fp64's precision. This is what catches wrong algebra: it is ~1e-9 of the fp32 noise.

CI runs a bounded number of examples (``NR_FUZZ_EXAMPLES``, default small); the long campaign is
``python bench/fuzz_campaign.py --examples 5000`` (writes bench/results/fuzz_campaign.json).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normrewrite.core.pass_infra import Pass, PassContext
from normrewrite.passes import REGISTRY
from normrewrite.trace import trace

EXAMPLES = int(os.environ.get("NR_FUZZ_EXAMPLES", "0")) or None

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


# --------------------------------------------------------------------------- harness


@dataclass
class ExactCase:
    model: nn.Module  # in eval mode, in its dtype
    inputs: tuple[torch.Tensor, ...]
    passes: Sequence[str | Pass]
    expect_changes: int | None = None  # rewrites the passes must make (None: don't check)
    description: dict[str, Any] = field(default_factory=dict)
    min_changes: int = 0  # at least this many rewrites (when the exact count is not fixed)

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in self.model.state_dict().values() if t.is_floating_point())


@dataclass(frozen=True)
class ExactResult:
    changes: int
    err_new: float
    err_orig: float
    bound: float
    scale: float


class NotSupportedHere(Exception):
    """The original model does not run in this dtype on this platform (e.g. an fp16 CPU kernel),
    or overflows in it: nothing to compare against."""


def _run(model: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def check_exact(case: ExactCase, tracer: str) -> ExactResult:
    """Trace, rewrite, compare against fp64 (see module docs). Raises AssertionError on a miss."""
    dtype = case.dtype
    # copies first: running a hook-API weight-normed module leaves a non-leaf weight behind
    ref_model = copy.deepcopy(case.model).double()
    to_trace = copy.deepcopy(case.model)
    yard_model = copy.deepcopy(case.model).float() if dtype == torch.float64 else None
    ref = _run(ref_model, _cast(case.inputs, torch.float64))
    try:
        orig = _run(case.model, case.inputs)
    except (RuntimeError, NotImplementedError) as e:
        raise NotSupportedHere(str(e)) from e
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(orig).all())):
        raise NotSupportedHere("the original overflows in this dtype")
    gm = trace(to_trace, case.inputs, tracer).graph_module  # type: ignore[arg-type]
    ctx = PassContext(example_inputs=case.inputs)
    changes = 0
    for spec in case.passes:
        result = REGISTRY.create(spec)(gm, ctx)
        gm = result.graph_module
        changes += len(result.changes)
    new = _run(gm, case.inputs)
    assert new.shape == ref.shape and new.dtype == orig.dtype, (
        new.shape,
        new.dtype,
        ref.shape,
        orig.dtype,
    )
    scale = float(ref.abs().max())
    err_new = float((new.double() - ref).abs().max())
    if yard_model is not None:
        yard = float(
            (_run(yard_model, _cast(case.inputs, torch.float32)).double() - ref).abs().max()
        )
        u = UNIT_ROUNDOFF[torch.float64]
        bound = 64 * (u / UNIT_ROUNDOFF[torch.float32]) * yard + 64 * u * scale
        err_orig = yard
    else:
        err_orig = float((orig.double() - ref).abs().max())
        bound = 8 * err_orig + 16 * UNIT_ROUNDOFF[dtype] * scale
    res = ExactResult(changes, err_new, err_orig, bound, scale)
    if case.expect_changes is not None:
        assert changes == case.expect_changes, (
            f"expected {case.expect_changes} rewrites, got {changes}: {case.description}"
        )
    assert changes >= case.min_changes, (
        f"expected a rewrite, got none: {case.description} ({tracer})"
    )
    assert err_new <= bound, f"{res} for {case.description} ({tracer})"
    return res


# --------------------------------------------------------------------------- fold-bn


class _Chain(nn.Module):
    def __init__(self, *mods: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _bn_stats(draw: st.DrawFn, bn: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    n = bn.num_features
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    var_kind = draw(st.sampled_from(["normal", "tiny", "large", "mixed"]))
    with torch.no_grad():
        bn.running_mean.copy_(
            torch.randn(n, generator=g) * draw(st.sampled_from([0.01, 1.0, 10.0]))
        )
        if var_kind == "normal":
            var = torch.rand(n, generator=g) * 2 + 0.05
        elif var_kind == "tiny":
            var = torch.rand(n, generator=g) * 1e-6
        elif var_kind == "large":
            var = torch.rand(n, generator=g) * 100 + 10
        else:
            var = torch.rand(n, generator=g) ** 6 * 10
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))  # negative γ included
            bn.bias.copy_(torch.randn(n, generator=g))
    return {"var": var_kind, "seed": seed}


_DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


@st.composite
def fold_bn_cases(draw: st.DrawFn) -> ExactCase:
    """A conv/linear layer with a BatchNorm after it (output side) or before it (input side)."""
    kind = draw(st.sampled_from(["conv", "conv_t", "linear", "flatten_linear"]))
    side = "input" if kind == "flatten_linear" else draw(st.sampled_from(["output", "input"]))
    if kind == "conv_t":
        side = "output"
    bias, affine = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-8]))
    dtype = draw(_DTYPES)
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    desc: dict[str, Any] = {
        "kind": kind,
        "side": side,
        "bias": bias,
        "affine": affine,
        "eps": eps,
        "dtype": str(dtype),
        "seed": seed,
    }
    expect = 1
    if kind in ("linear", "flatten_linear"):
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        lin = nn.Linear(fin, fout, bias=bias)
        if kind == "flatten_linear":
            c, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
            bn = nn.BatchNorm2d(c, eps=eps, affine=affine)
            lin = nn.Linear(c * h * w, fout, bias=bias)
            model = _Chain(bn, nn.Flatten(1), lin)
            x = torch.randn(batch, c, h, w)
        elif side == "output":
            bn = nn.BatchNorm1d(fout, eps=eps, affine=affine)
            model, x = _Chain(lin, bn), torch.randn(batch, fin)
        else:
            bn = nn.BatchNorm1d(fin, eps=eps, affine=affine)
            model, x = _Chain(bn, lin), torch.randn(batch, fin)
        desc.update(fin=fin, fout=fout)
    else:
        nd = draw(st.integers(1, 3))
        groups = draw(st.integers(1, 3))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        mode = "zeros"
        if kind == "conv" and side == "input" and draw(st.booleans()):
            mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
        size = draw(st.integers(max(3, (k - 1) * dilation + 1, padding + 1), 7 if nd < 3 else 5))
        conv_cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1]
        bn_cls = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][nd - 1]
        if kind == "conv_t":
            out_pad = draw(st.integers(0, max(stride, dilation) - 1))
            tconv = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][nd - 1]
            layer = tconv(
                cin,
                cout,
                k,
                stride=stride,
                padding=min(padding, (k - 1) * dilation),
                output_padding=out_pad,
                groups=groups,
                bias=bias,
                dilation=dilation,
            )
        else:
            layer = conv_cls(
                cin,
                cout,
                k,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
                padding_mode=mode,
            )
        if side == "output":
            model = _Chain(layer, bn_cls(cout, eps=eps, affine=affine))
            bn = model.body[1]
        else:
            model = _Chain(bn_cls(cin, eps=eps, affine=affine), layer)
            bn = model.body[0]
            if mode == "zeros" and padding > 0:
                expect = 0  # not exact: zero padding would be 0 instead of the BN shift
        x = torch.randn(batch, cin, *([size] * nd))
        desc.update(
            nd=nd,
            groups=groups,
            cin=cin,
            cout=cout,
            k=k,
            stride=stride,
            dilation=dilation,
            padding=padding,
            mode=mode,
        )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5))
    desc.update(_bn_stats(draw, bn))
    model = model.eval().to(dtype)
    return ExactCase(model, (x.to(dtype),), ["fold-bn"], expect, desc)


# --------------------------------------------------------------------------- norm passes


def _randomize_affine(draw: st.DrawFn, norm: nn.Module) -> None:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if isinstance(w, torch.Tensor):
            w.copy_(torch.randn(w.shape, generator=g))  # negative γ included
        if isinstance(b, torch.Tensor):
            b.copy_(torch.randn(b.shape, generator=g))


class _NormThenLinears(nn.Module):
    """A norm read by 1-3 linear layers (q/k/v style), their outputs summed."""

    def __init__(self, norm: nn.Module, d: int, outs: list[int], bias: list[bool]) -> None:
        super().__init__()
        self.norm = norm
        self.heads = nn.ModuleList(nn.Linear(d, o, bias=b) for o, b in zip(outs, bias, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.cat([lin(h) for lin in self.heads], dim=-1)


@st.composite
def fold_norm_affine_cases(draw: st.DrawFn) -> ExactCase:
    d = draw(st.integers(2, 24))
    kind = draw(st.sampled_from(["layernorm", "layernorm_nobias", "rmsnorm"]))
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-2]))
    if kind == "rmsnorm":
        norm: nn.Module = nn.RMSNorm(d, eps=eps)
    else:
        norm = nn.LayerNorm(d, eps=eps, bias=kind == "layernorm")
    _randomize_affine(draw, norm)
    n = draw(st.integers(1, 3))
    outs = [draw(st.integers(1, 12)) for _ in range(n)]
    bias = [draw(st.booleans()) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = _NormThenLinears(norm, d, outs, bias).eval().to(dtype)
    x = torch.randn(draw(st.integers(1, 2)), draw(st.integers(1, 5)), d) * draw(
        st.sampled_from([0.1, 1.0, 30.0])
    )
    desc = {"kind": kind, "d": d, "eps": eps, "outs": outs, "bias": bias, "dtype": str(dtype)}
    return ExactCase(model, (x.to(dtype),), ["fold-norm-affine"], None, desc, min_changes=1)


class _ManualNorm(nn.Module):
    """RMSNorm / LayerNorm written out as elementwise ops, the way model code spells them."""

    def __init__(self, d: int, form: str, eps: float, gamma: bool, beta: bool) -> None:
        super().__init__()
        self.form, self.eps = form, eps
        self.weight = nn.Parameter(torch.randn(d)) if gamma else None
        self.bias = nn.Parameter(torch.randn(d)) if beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "rms_pow_rsqrt":
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        elif self.form == "rms_square_div_sqrt":
            y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
        elif self.form == "ln_rsqrt":
            c = x - x.mean(-1, keepdim=True)
            y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)
        else:  # ln_var
            c = x - x.mean(-1, keepdim=True)
            y = c / torch.sqrt(x.var(-1, keepdim=True, correction=0) + self.eps)
        if self.weight is not None:
            y = self.weight * y
        if self.bias is not None:
            y = y + self.bias
        return y


@st.composite
def fuse_norm_cases(draw: st.DrawFn) -> ExactCase:
    d = draw(st.integers(2, 32))
    form = draw(st.sampled_from(["rms_pow_rsqrt", "rms_square_div_sqrt", "ln_rsqrt", "ln_var"]))
    gamma = draw(st.booleans())
    beta = gamma and form.startswith("ln") and draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-2]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = _Chain(nn.Linear(d, d), _ManualNorm(d, form, eps, gamma, beta)).eval().to(dtype)
    x = torch.randn(draw(st.integers(1, 2)), draw(st.integers(1, 5)), d) * draw(
        st.sampled_from([0.01, 1.0, 30.0])
    )
    desc = {"form": form, "d": d, "eps": eps, "gamma": gamma, "beta": beta, "dtype": str(dtype)}
    return ExactCase(model, (x.to(dtype),), ["fuse-norm"], None, desc, min_changes=1)


@st.composite
def remove_weight_norm_cases(draw: st.DrawFn) -> ExactCase:
    api = draw(st.sampled_from(["parametrizations", "hook"]))
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dim = draw(st.sampled_from([0, 1]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "linear":
        layer: nn.Module = nn.Linear(cin, cout, bias=draw(st.booleans()))
        x = torch.randn(2, cin)
    elif kind == "conv1d":
        layer = nn.Conv1d(cin, cout, draw(st.integers(1, 3)), bias=draw(st.booleans()))
        x = torch.randn(2, cin, 6)
    else:
        layer = nn.Conv2d(cin, cout, draw(st.integers(1, 3)), bias=draw(st.booleans()))
        x = torch.randn(2, cin, 5, 5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if api == "hook":
            layer = torch.nn.utils.weight_norm(layer, dim=dim)
        else:
            layer = torch.nn.utils.parametrizations.weight_norm(layer, dim=dim)
    with torch.no_grad():  # a magnitude that is not the init's ‖v‖
        for name, p in layer.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.copy_(torch.randn_like(p))
    if api == "hook":  # the hook stores a computed (non-leaf) weight, recomputed every call
        layer.weight = layer.weight.detach()
    model = _Chain(layer).eval().to(dtype)
    desc = {"api": api, "kind": kind, "cin": cin, "cout": cout, "dim": dim, "dtype": str(dtype)}
    return ExactCase(model, (x.to(dtype),), ["remove-weight-norm"], None, desc, min_changes=1)


class _PreLN(nn.Module):
    """A Pre-LN residual stack: embedding → [x + W(LN(x))] × L → LN → head."""

    def __init__(self, vocab: int, d: int, layers: int, eps: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=eps) for _ in range(layers))
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return self.head(self.final(x))


@st.composite
def ln_to_rmsnorm_cases(draw: st.DrawFn) -> ExactCase:
    vocab, d, layers = draw(st.integers(4, 30)), draw(st.integers(2, 24)), draw(st.integers(1, 3))
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-2]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    model = _PreLN(vocab, d, layers, eps)
    for norm in [*model.norms, model.final]:
        _randomize_affine(draw, norm)
    with torch.no_grad():
        model.emb.weight.add_(draw(st.sampled_from([0.0, 1.0, 5.0])))  # a stream with a real mean
    ids = torch.randint(0, vocab, (draw(st.integers(1, 2)), draw(st.integers(1, 6))))
    desc = {"vocab": vocab, "d": d, "layers": layers, "eps": eps, "dtype": str(dtype)}
    return ExactCase(model.eval().to(dtype), (ids,), ["ln-to-rmsnorm"], None, desc, min_changes=1)


@st.composite
def swap_bn_frozen_cases(draw: st.DrawFn) -> ExactCase:
    """BatchNorm (after a conv or alone) → frozen per-channel affine (swap-norm, exact)."""
    nd = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    dtype = draw(_DTYPES)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][nd - 1](c, eps=eps, affine=affine)
    desc = {"nd": nd, "c": c, "affine": affine, "eps": eps, "dtype": str(dtype)}
    desc.update(_bn_stats(draw, bn))
    if draw(st.booleans()):
        conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1](c, c, 1)
        model = _Chain(conv, bn)
    else:
        model = _Chain(bn)
    # the input's RNG stream must differ from the statistics' (both seeds shrink to 0): with the
    # same stream x == running_mean exactly, the output is 0 and its relative error undefined
    gx = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)) + 1_000_003)
    x = torch.randn(draw(st.integers(1, 2)), c, *([draw(st.integers(1, 4))] * nd), generator=gx)
    spec = "swap-norm:from=batchnorm,to=frozen"
    return ExactCase(model.eval().to(dtype), (x.to(dtype),), [spec], None, desc, min_changes=1)


@st.composite
def swap_in_gn_cases(draw: st.DrawFn) -> ExactCase:
    """InstanceNorm (no running stats) → GroupNorm with one channel per group (exact)."""
    c = draw(st.integers(1, 8))
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    norm = nn.InstanceNorm2d(c, eps=eps, affine=affine)
    _randomize_affine(draw, norm)
    model = _Chain(nn.Conv2d(c, c, 1), norm)
    x = torch.randn(draw(st.integers(1, 2)), c, draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    desc = {"c": c, "affine": affine, "eps": eps, "dtype": str(dtype)}
    spec = "swap-norm:from=instancenorm,to=groupnorm"
    return ExactCase(model.eval().to(dtype), (x.to(dtype),), [spec], None, desc, min_changes=1)


@st.composite
def apply_weight_norm_cases(draw: st.DrawFn) -> ExactCase:
    """Plain conv/linear (optionally + BN, mean_only_bn) → g·v/‖v‖ re-parameterisation (exact)."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv_t2d"]))
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "linear":
        layer: nn.Module = nn.Linear(cin, cout, bias=bias)
        x, bn_cls = torch.randn(2, cin), nn.BatchNorm1d
    elif kind == "conv1d":
        layer = nn.Conv1d(cin, cout, draw(st.integers(1, 3)), bias=bias)
        x, bn_cls = torch.randn(2, cin, 6), nn.BatchNorm1d
    elif kind == "conv2d":
        k = draw(st.integers(1, 3))
        layer = nn.Conv2d(cin, cout, k, padding=draw(st.integers(0, 1)), bias=bias)
        x, bn_cls = torch.randn(2, cin, 5, 5), nn.BatchNorm2d
    else:
        layer = nn.ConvTranspose2d(
            cin, cout, draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), bias=bias
        )
        x, bn_cls = torch.randn(2, cin, 4, 4), nn.BatchNorm2d
    mean_only = draw(st.booleans())
    mods = [layer]
    desc: dict[str, Any] = {
        "kind": kind,
        "cin": cin,
        "cout": cout,
        "bias": bias,
        "dtype": str(dtype),
    }
    if mean_only:
        bn = bn_cls(cout)
        desc.update(_bn_stats(draw, bn))
        mods.append(bn)
    spec = "apply-weight-norm:mean_only_bn=true" if mean_only else "apply-weight-norm"
    desc["spec"] = spec
    model = _Chain(*mods).eval().to(dtype)
    return ExactCase(model, (x.to(dtype),), [spec], None, desc, min_changes=1)


# --------------------------------------------------------------------------- the registry of strategies


def _strategies() -> dict[str, Callable[[], st.SearchStrategy[ExactCase]]]:
    """Pass name → strategy, for the exact passes registered now."""
    out: dict[str, Callable[[], st.SearchStrategy[ExactCase]]] = {
        "fold-bn": fold_bn_cases,
        "fold-norm-affine": fold_norm_affine_cases,
        "fuse-norm": fuse_norm_cases,
        "remove-weight-norm": remove_weight_norm_cases,
        "apply-weight-norm": apply_weight_norm_cases,
        "ln-to-rmsnorm": ln_to_rmsnorm_cases,
        "swap-norm:from=batchnorm,to=frozen": swap_bn_frozen_cases,
        "swap-norm:from=instancenorm,to=groupnorm": swap_in_gn_cases,
    }
    return {k: v for k, v in out.items() if k.partition(":")[0] in REGISTRY}


STRATEGIES = _strategies()
TRACERS = ["fx", "export"]


def run_case(case: ExactCase, tracer: str) -> ExactResult | None:
    """check_exact, with platforms that cannot run the original in that dtype skipped (None)."""
    try:
        return check_exact(case, tracer)
    except NotSupportedHere:
        return None


def _ci_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_ci_settings(60)
@given(case=fold_bn_cases())
def test_fold_bn_exact_fx(case: ExactCase) -> None:
    run_case(case, "fx")


@_ci_settings(12)
@given(case=fold_bn_cases())
def test_fold_bn_exact_export(case: ExactCase) -> None:
    run_case(case, "export")


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"fold-bn"}))
def test_norm_pass_exact(name: str, tracer: str) -> None:
    """fold-norm-affine, fuse-norm, ln-to-rmsnorm, remove-weight-norm (whichever are registered)."""

    @_ci_settings(12 if tracer == "fx" else 5)
    @given(case=STRATEGIES[name]())
    def prop(case: ExactCase) -> None:
        run_case(case, tracer)

    prop()


# Exact passes this file does not fuzz, each with the reason; a new exact pass must get a strategy
# or an entry here (the test below fails otherwise, and fails when an entry goes stale).
NOT_FUZZED = {
    "fix-export": "layout-only rewrites (contiguous → clone, view → reshape, SDPA broadcast → expand) "
    "with no numeric parameters to draw; parity is covered case by case in "
    "tests/passes/test_fix_export.py and by tests/test_contract.py",
}


def test_every_exact_pass_is_fuzzed_or_listed() -> None:
    """Every registered exact pass has a strategy here, or is in NOT_FUZZED with its reason."""
    exact = {p.name for p in REGISTRY if p.exact}
    fuzzed = {k.partition(":")[0] for k in STRATEGIES}
    assert "fold-bn" in fuzzed
    assert exact - fuzzed == set(NOT_FUZZED), f"unfuzzed exact passes: {sorted(exact - fuzzed)}"
    assert not set(NOT_FUZZED) & fuzzed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_harness_catches_a_slightly_wrong_fold(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The harness must fail on a fold that is off by a little (ε halved): it cannot pass vacuously."""
    from normrewrite.passes.fold_bn import fx as fold_bn  # the module whose fold calls bn_affine

    torch.manual_seed(0)
    model = _Chain(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6, eps=1e-3))
    with torch.no_grad():
        model.body[1].running_var.uniform_(0.05, 0.2)
        model.body[1].weight.normal_()
    case = ExactCase(
        model.eval().to(dtype), (torch.randn(2, 4, 6, 6, dtype=dtype),), ["fold-bn"], 1
    )
    assert check_exact(case, "fx").changes == 1
    real = fold_bn.bn_affine
    monkeypatch.setattr(fold_bn, "bn_affine", lambda m, v, g, b, eps: real(m, v, g, b, eps / 2))
    with pytest.raises(AssertionError):
        check_exact(case, "fx")

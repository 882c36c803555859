"""Residual-stream analysis: residual adds and norm placement on real architectures (HF BERT,
GPT-2, GPT-NeoX parallel residual) and hand-written blocks (sandwich, post/pre, no residual), on
both graph flavours where the model allows (HF models need torch.export)."""

from __future__ import annotations

import functools

import models
import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from normrewrite.analysis.residual import is_add, norm_placements, residual_adds, residual_sums
from normrewrite.trace import trace

TRACERS = ("fx", "export")
SEQ = 8

# --------------------------------------------------------------------------- hand-written models


class Attention(nn.Module):
    """Single-head self-attention with a mask and reshapes, enough to exercise a real branch."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        # a causal mask for sequences of SEQ tokens
        self.register_buffer(
            "mask", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.d)).unbind(-2)
        scores = q @ k.transpose(1, 2) / self.d**0.5
        scores = scores.masked_fill(self.mask, -1e4)
        return self.drop(self.out(scores.softmax(-1) @ v))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """``kind``: post ``LN(x + F(x))``, pre ``x + F(LN(x))``, sandwich ``x + LN2(F(LN1(x)))``."""

    def __init__(self, d: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn, self.mlp = Attention(d), MLP(d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if kind == "sandwich":
            self.ln1_out, self.ln2_out = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "post":
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        if self.kind == "pre":
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = x + self.ln1_out(self.attn(self.ln1(x)))
        return x + self.ln2_out(self.mlp(self.ln2(x)))


class Encoder(nn.Module):
    """Embedding (+ an embedding norm), ``layers`` blocks, a final norm for pre/sandwich stacks."""

    def __init__(self, kind: str, layers: int = 2, d: int = 16, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, kind) for _ in range(layers))
        self.final = nn.LayerNorm(d) if kind != "post" else nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb_norm(self.emb(ids))
        for b in self.blocks:
            x = b(x)
        return self.final(x)


def encoder(kind: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return models.randomize_norms(Encoder(kind, layers)).eval()


def ids(batch: int = 2, seq: int = SEQ, vocab: int = 50) -> tuple[torch.Tensor]:
    return (models.token_ids(batch, seq, vocab),)


@functools.cache
def neox() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        use_parallel_residual=True,
        use_cache=False,
    )
    return models.randomize_norms(transformers.GPTNeoXModel(cfg)).eval()


def traced(model: nn.Module, inputs: tuple, tracer: str = "export") -> GraphModule:
    return trace(model, inputs, tracer).graph_module


def placements(gm: GraphModule) -> list[tuple[str, str]]:
    return [(p.norm.label, p.placement) for p in norm_placements(gm)]


# --------------------------------------------------------------------------- real architectures


def test_bert_is_post_norm() -> None:
    gm = traced(models.bert(layers=2), (models.token_ids(),))
    res = residual_adds(gm)
    assert len(res) == 4  # attention + feed-forward, per layer
    assert len(residual_sums(res)) == 4
    for r in res:
        assert is_add(r.node) and r.branch in r.branch_nodes and r.skip not in r.branch_nodes
        assert r.entries, "every branch reads the stream value"
    assert placements(gm) == [
        ("embeddings.LayerNorm", "other"),
        ("encoder.layer.0.attention.output.LayerNorm", "post"),
        ("encoder.layer.0.output.LayerNorm", "post"),
        ("encoder.layer.1.attention.output.LayerNorm", "post"),
        ("encoder.layer.1.output.LayerNorm", "post"),
    ]
    # the attention branch goes through the mask, dropout, reshapes: its nodes include SDPA
    attn = res[0]
    assert any("attention" in str(n.target) for n in attn.branch_nodes if n.op == "call_function")
    blocks = [p.block for p in norm_placements(gm)]
    assert blocks == [
        None,
        "encoder.layer.0.attention",
        "encoder.layer.0",
        "encoder.layer.1.attention",
        "encoder.layer.1",
    ]


def test_gpt2_is_pre_norm_with_final() -> None:
    gm = traced(models.gpt2(layers=2), (models.token_ids(),))
    assert placements(gm) == [
        ("h.0.ln_1", "pre"),
        ("h.0.ln_2", "pre"),
        ("h.1.ln_1", "pre"),
        ("h.1.ln_2", "pre"),
        ("ln_f", "final"),
    ]
    # the tanh-GELU's x + 0.044715·x³ is an add of a value and a function of it, not a residual
    assert len(residual_adds(gm)) == 4


def test_parallel_residual_neox() -> None:
    gm = traced(neox(), (models.token_ids(),))
    res = residual_adds(gm)
    sums = residual_sums(res)
    assert len(res) == 4 and len(sums) == 2  # two branches into each of two sums
    for s in sums:
        branches = [r for r in res if r.sum is s]
        assert len({r.skip for r in branches}) == 1
        assert len({r.branch for r in branches}) == 2
    assert placements(gm) == [
        ("layers.0.input_layernorm", "pre"),
        ("layers.0.post_attention_layernorm", "pre"),
        ("layers.1.input_layernorm", "pre"),
        ("layers.1.post_attention_layernorm", "pre"),
        ("final_layer_norm", "final"),
    ]


@pytest.mark.parametrize("order", ["x_first", "x_last"])
def test_parallel_sum_in_any_order(order: str) -> None:
    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.attn, self.mlp = nn.LayerNorm(16), Attention(16), MLP(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            if order == "x_first":
                return x + self.attn(h) + self.mlp(h)
            return self.mlp(h) + self.attn(h) + x

    x = torch.randn(2, SEQ, 16)
    gm = traced(Parallel().eval(), (x,), "fx")
    res = residual_adds(gm)
    assert len(res) == 2 and len(residual_sums(res)) == 1
    assert {r.skip.name for r in res} == {"x"}
    assert placements(gm) == [("ln", "pre")]


# --------------------------------------------------------------------------- hand-written blocks


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("post", ["other", "post", "post", "post", "post"]),
        ("pre", ["other", "pre", "pre", "pre", "pre", "final"]),
        (
            "sandwich",
            [
                "other",
                "pre",
                "sandwich",
                "pre",
                "sandwich",
                "pre",
                "sandwich",
                "pre",
                "sandwich",
                "final",
            ],
        ),
    ],
)
def test_hand_written_blocks(kind: str, expected: list[str], tracer: str) -> None:
    gm = traced(encoder(kind), ids(), tracer)
    assert [p for _, p in placements(gm)] == expected
    assert len(residual_sums(residual_adds(gm))) == 4


def test_branch_output_norm_without_pre_norm_is_res_post() -> None:
    class ResPostNorm(nn.Module):  # Swin-v2 style x + LN(F(x)): not a sandwich
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.ln = MLP(16), nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.ln(self.mlp(x))

    gm = traced(ResPostNorm().eval(), (torch.randn(2, 16),), "fx")
    assert placements(gm) == [("ln", "res-post")]


@pytest.mark.parametrize("tracer", TRACERS)
def test_no_residual_structure(tracer: str) -> None:
    class Plain(nn.Module):  # an MLP with norms, a bias-like add and x + f(x) without weights
        def __init__(self) -> None:
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16)
            self.shift = nn.Parameter(torch.randn(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(self.a(x)) + self.shift
            h = h + 0.044715 * h**3
            return self.b(h)

    gm = traced(Plain().eval(), (torch.randn(2, 16),), tracer)
    assert residual_adds(gm) == []
    assert placements(gm) == [("ln", "other")]


# --------------------------------------------------------------------------- inspect


def test_inspect_reports_placement_per_block(tmp_path) -> None:
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from normrewrite.cli import main

    factory = tmp_path / "gpt2_model.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import models\n\n"
        "def build():\n"
        "    return models.gpt2(layers=2), (models.token_ids(),)\n"
    )
    r = CliRunner().invoke(main, ["inspect", f"{factory}:build", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    got = [(n["name"], n["type"], n["placement"], n["block"]) for n in data["norms"]]
    assert got == [
        ("h.0.ln_1", "layernorm", "pre", "h.0"),
        ("h.0.ln_2", "layernorm", "pre", "h.0"),
        ("h.1.ln_1", "layernorm", "pre", "h.1"),
        ("h.1.ln_2", "layernorm", "pre", "h.1"),
        ("ln_f", "layernorm", "final", "h.1"),
    ]
    table = CliRunner().invoke(main, ["inspect", f"{factory}:build"], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "placement" in table.stdout and "final" in table.stdout and "pre" in table.stdout


# --------------------------------------------------------------------------- Gemma/OLMo families


def _decoder(name: str) -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    common = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    if name == "gemma3":
        model = t.Gemma3TextModel(t.Gemma3TextConfig(**common, head_dim=16))
    else:
        model = t.Olmo2Model(t.Olmo2Config(**common, eos_token_id=0, pad_token_id=0))
    return models.randomize_norms(model).eval()


# the norms these models write out (RMSNorm) are placed the same before and after fuse-norm
@pytest.mark.parametrize("fused_first", [True, False])
@pytest.mark.parametrize(
    ("name", "layer"),
    [
        (
            "gemma3",  # sandwich norms around each sublayer, per-head QK-norm
            ["pre", "qk-norm", "qk-norm", "sandwich", "pre", "sandwich"],
        ),
        ("olmo2", ["qk-norm", "qk-norm", "res-post", "res-post"]),  # x + N(F(x)), QK-norm
    ],
)
def test_written_rmsnorm_families(name: str, layer: list[str], fused_first: bool) -> None:
    from normrewrite.core.pass_infra import PassContext
    from normrewrite.passes import REGISTRY

    inputs = (models.token_ids(),)
    gm = traced(_decoder(name), inputs)
    if fused_first:
        REGISTRY.create("fuse-norm")(gm, PassContext(example_inputs=inputs))
    got = placements(gm)
    assert [p for _, p in got] == layer * 2 + ["final"]
    assert got[-1][0] == "norm"

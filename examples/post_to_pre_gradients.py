"""Per-layer gradient norms at initialisation: a Post-LN encoder vs the same model after post-to-pre.

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture") show that at
initialisation a Post-LN Transformer has large gradients on the layers near the output (and needs a
learning-rate warm-up), while in the Pre-LN version the gradient norm is about the same in every
layer. This example builds a freshly initialised Post-LN encoder (Hugging Face ``BertModel`` from a
small config, 12 layers), converts it with ``normrewrite.convert(..., passes=["post-to-pre"])``, and
measures the gradient norm of each layer's feed-forward weights under a token-prediction loss,
averaged over a few random batches. It writes ``post_to_pre_gradients.png`` (and prints the
figures).

What it shows (12 layers, hidden 64, Xavier-scale init): the Post-LN layers near the output get
about 3× the gradient of the same layers after post-to-pre (Theorem 1 of the paper: the Post-LN
last-layer gradient does not shrink with depth, the Pre-LN one shrinks like 1/√L), and the Post-LN
profile leans further towards the output than the Pre-LN one. In this small random-data setup
neither profile has exactly the paper's shape (the Pre-LN one decays with depth, the Post-LN one is
roughly flat); ``tests/passes/test_post_to_pre.py`` asserts only the two measured directions.

    python examples/post_to_pre_gradients.py [--layers 12] [--hidden 64] [--out examples/post_to_pre_gradients.png]
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(layers: int = 12, hidden: int = 64, vocab: int = 200, seed: int = 0) -> nn.Module:
    """A freshly initialised Post-LN encoder (BERT architecture)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 4,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=hidden**-0.5,  # Xavier-like scale, as in Xiong et al.'s analysis
    )
    return transformers.BertModel(cfg).eval()


_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.(?:intermediate|output)\.dense\.weight$")


def layer_grad_norms(
    model: Callable[..., Any],
    params: dict[str, nn.Parameter],
    vocab: int,
    hidden: int,
    *,
    batches: int = 4,
    batch: int = 8,
    seq: int = 32,
    seed: int = 0,
) -> list[float]:
    """Mean (over batches) gradient norm of each layer's feed-forward weights, by layer index."""
    gen = torch.Generator().manual_seed(seed)
    readout = torch.randn(hidden, vocab, generator=gen) / hidden**0.5
    by_layer: dict[int, list[str]] = {}
    for name in params:
        m = _LAYER.search(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
    if not by_layer:
        raise ValueError("no feed-forward weights named layer.N.(intermediate|output).dense.weight")
    sums = [0.0] * (max(by_layer) + 1)
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        for p in params.values():
            p.grad = None
        out = model(ids)
        hidden_states = out[0] if isinstance(out, tuple | list) else out.last_hidden_state
        loss = nn.functional.cross_entropy(
            (hidden_states @ readout).flatten(0, 1), labels.flatten()
        )
        loss.backward()
        for i, names in by_layer.items():
            sums[i] += sum(float(params[n].grad.norm() ** 2) for n in names) ** 0.5 / batches
    return sums


def measure(
    layers: int = 12,
    hidden: int = 64,
    vocab: int = 200,
    seed: int = 0,
    *,
    batches: int = 4,
    batch: int = 8,
    seq: int = 32,
) -> dict[str, list[float]]:
    """Per-layer gradient norms of the Post-LN model and of its post-to-pre conversion."""
    import normrewrite

    post = build(layers, hidden, vocab, seed)
    # the traced graph is specialised to the example shape: trace with the batch shape used below
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    pre = normrewrite.convert(post, passes=["post-to-pre"], example_inputs=(ids,)).graph_module
    kw = {"batches": batches, "batch": batch, "seq": seq, "seed": seed}
    return {
        "post": layer_grad_norms(post, dict(post.named_parameters()), vocab, hidden, **kw),
        "pre": layer_grad_norms(pre, dict(pre.named_parameters()), vocab, hidden, **kw),
    }


def plot(norms: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label, style in (
        ("post", "Post-LN (original)", "o-"),
        ("pre", "Pre-LN (post-to-pre)", "s-"),
    ):
        ax.plot(range(1, len(norms[key]) + 1), norms[key], style, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("‖∇W_FFN‖ at initialisation")
    ax.set_yscale("log")
    ax.set_title("Gradient norm per layer (Xiong et al. 2020)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("post_to_pre_gradients.png")
    )
    args = ap.parse_args()
    norms = measure(args.layers, args.hidden)
    print("layer  post-LN    pre-LN")
    for i, (a, b) in enumerate(zip(norms["post"], norms["pre"], strict=True), 1):
        print(f"{i:5d}  {a:.4g}  {b:.4g}")
    for key in ("post", "pre"):
        print(f"{key}: last/first layer gradient norm ratio {norms[key][-1] / norms[key][0]:.3g}")
    plot(norms, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

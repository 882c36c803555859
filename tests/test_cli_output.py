"""What the CLI prints when its output is not a terminal (piped, as in CI and under CliRunner):
full module names and notes, never cut at 80 columns; a failing load or trace prints its one line
alone (no library log); a float ``--input`` feeding token ids says to give an integer dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normrewrite.passes import REGISTRY
from normrewrite.trace import integer_ids_hint

LONG_NAME = "encoder.layer.0.attention.output.LayerNorm"  # 42 characters, deep in a table


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with stdout and stderr piped (not a terminal) and no COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    return subprocess.run(
        [sys.executable, "-m", "normrewrite.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import bert

    d = tmp_path_factory.mktemp("hf") / "bert"
    bert(layers=1).save_pretrained(d)
    return d


def test_convert_report_is_whole_when_piped(bert_dir: Path, tmp_path: Path) -> None:
    r = run_cli("convert", bert_dir, "-p", "fold-norm-affine", "-o", tmp_path / "b.pt2")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert "…" not in r.stdout
    # every skip names its norm in full, with its whole reason on the same line
    [skip] = [line for line in out if f"skipped {LONG_NAME}:" in line]
    assert "(add.Tensor), which is not a linear layer" in skip, skip
    # the tracer note is one line, not cut or wrapped mid-sentence
    [note] = [line for line in out if line.startswith("note: symbolic_trace failed")]
    assert note.rstrip().endswith("used torch.export"), note
    assert any("/b.pt2 [pt2]" in line for line in out)


def test_inspect_table_is_whole_when_piped(bert_dir: Path) -> None:
    r = run_cli("inspect", bert_dir)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert any(LONG_NAME in line for line in r.stdout.splitlines()), r.stdout
    header = lines(r.stdout)[0]
    assert header.startswith("BertModel (") and header.rstrip().endswith("norm layers"), header


def test_passes_table_is_whole_when_piped() -> None:
    r = run_cli("passes")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    for p in REGISTRY:  # each summary on one line, uncut
        assert any(p.summary in line for line in r.stdout.splitlines()), p.summary


# --------------------------------------------------------------------------- noise and hints


@pytest.fixture(scope="module")
def levit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LeViT (attention biases sized for 32x32 images): any other size fails in torch's
    fake-tensor broadcasting, which logs a traceback at ERROR level."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LevitConfig(
        image_size=32,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 3],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        patch_size=16,
        attention_ratio=[2, 2, 2],
        mlp_ratio=[2, 2, 2],
    )
    d = tmp_path_factory.mktemp("hf") / "levit"
    transformers.LevitModel(cfg).eval().save_pretrained(d)
    return d


def test_wrong_spatial_size_prints_one_line(levit_dir: Path, tmp_path: Path) -> None:
    r = run_cli("convert", levit_dir, "--input", "1x3x100x100", "-o", tmp_path / "l.pt2")
    assert r.returncode == 1
    [line] = lines(r.stderr)  # no torch log before it
    assert line.startswith("Error: torch.export failed: RuntimeError:"), line
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_wrong_spatial_size_debug_keeps_the_logs(levit_dir: Path, tmp_path: Path) -> None:
    r = run_cli("convert", levit_dir, "--input", "1x3x100x100", "-o", tmp_path / "l.pt2", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and len(lines(r.stderr)) > 1


def test_float_token_ids_get_an_integer_dtype_hint(bert_dir: Path, tmp_path: Path) -> None:
    r = run_cli("convert", bert_dir, "--input", "1x16", "-o", tmp_path / "b.pt2")
    assert r.returncode == 1
    [line] = lines(r.stderr)
    assert line.startswith("Error: ") and line.endswith(
        "(token ids need an integer dtype: --input 1x16:int64)"
    ), line


def test_integer_ids_hint_only_for_float_inputs_into_embeddings() -> None:
    emb = nn.Sequential(nn.Embedding(10, 4))
    float_ids, int_ids = torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int64)
    long_err = RuntimeError("expected scalar types: Long, Int; but got torch.float32")
    assert integer_ids_hint(emb, (float_ids,), long_err) == (
        " (token ids need an integer dtype: --input 2x5:int64)"
    )
    assert integer_ids_hint(emb, (int_ids,), long_err) == ""  # ids already integer
    conv = nn.Conv2d(3, 4, 3)
    shape_err = RuntimeError(
        "Given groups=1, weight of size [4, 3, 3, 3], expected input to have 3 channels"
    )
    assert integer_ids_hint(conv, (torch.zeros(1, 5, 8, 8),), shape_err) == ""
    assert integer_ids_hint(conv, (torch.zeros(1, 5),), long_err) == ""  # no embedding, no indices
    index_err = RuntimeError("Expected tensor for argument #1 'indices' to have scalar type Long")
    assert integer_ids_hint(conv, (torch.zeros(1, 5),), index_err).endswith("--input 1x5:int64)")

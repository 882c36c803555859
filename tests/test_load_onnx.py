"""ONNX input limits (normrewrite/load/onnx.py, issue 10 item 9): a file may not ask for unbounded
work. Nodes, graph nesting and declared tensor bytes are checked on the parsed proto, before
anything is built from it; each refusal is one LoadError line naming the limit's keyword. Every
file is generated here (cheaply: a long graph is one serialized node repeated)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from normrewrite.cli import main
from normrewrite.errors import LoadError
from normrewrite.load.onnx import OnnxLimits, load_onnx

F = TensorProto.FLOAT


def chain(n: int) -> onnx.ModelProto:
    """x → Identity → Add(v, v) → Identity → … : ``n`` nodes, a valid model."""
    nodes = [
        helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"])
        if i % 2 == 0
        else helper.make_node("Add", [f"v{i}", f"v{i}"], [f"v{i + 1}"])
        for i in range(n)
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("v0", F, [2])],
        [helper.make_tensor_value_info(f"v{n}", F, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def repeated_nodes(n: int) -> bytes:
    """A ModelProto of ``n`` copies of one Identity node, built as bytes (a NodeProto is a
    repeated field of GraphProto: concatenated copies parse as a list)."""
    node = helper.make_node("Identity", ["x"], ["x"])
    one = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [1])], [])
    empty = helper.make_graph([], "g", [helper.make_tensor_value_info("x", F, [1])], [])
    g1, g0 = one.SerializeToString(), empty.SerializeToString()
    assert g1.endswith(g0)  # field 1 (node) is serialized first
    graph = g1[: len(g1) - len(g0)] * n + g0
    head = helper.make_model(
        helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 18)]
    )
    head.ClearField("graph")
    return head.SerializeToString() + b"\x3a" + _varint(len(graph)) + graph  # field 7: graph


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def nested(depth: int) -> onnx.ModelProto:
    """``If`` bodies nested ``depth`` graphs deep (the main graph is depth 1)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y0"])],
        "leaf",
        [],
        [helper.make_tensor_value_info("y0", F, [1])],
    )
    for d in range(depth - 1):
        node = helper.make_node("If", ["c"], [f"y{d + 1}"], then_branch=body, else_branch=body)
        body = helper.make_graph(
            [node], f"g{d}", [], [helper.make_tensor_value_info(f"y{d + 1}", F, [1])]
        )
    graph = helper.make_graph(
        list(body.node),
        "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", F, [1])],
        list(body.output),
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_200k_node_graph_is_refused_over_a_lowered_limit(tmp_path: Path) -> None:
    path = tmp_path / "long.onnx"
    onnx.save(chain(200_000), str(path))
    start = time.perf_counter()
    with pytest.raises(LoadError, match=r"more than 100000 nodes .* max_nodes=100000") as e:
        load_onnx(path, OnnxLimits(max_nodes=100_000))
    assert time.perf_counter() - start < 30  # refused on the proto, not after building the IR
    assert "\n" not in str(e.value)


def test_the_node_limit_is_the_boundary(tmp_path: Path) -> None:
    path = tmp_path / "chain.onnx"
    onnx.save(chain(2_000), str(path))
    with pytest.raises(LoadError, match="max_nodes=1999"):
        load_onnx(path, OnnxLimits(max_nodes=1_999))
    model = load_onnx(path, OnnxLimits(max_nodes=2_000))
    assert sum(1 for _ in model.graph) == 2_000


def test_default_limit_refuses_more_nodes_than_it_allows(tmp_path: Path) -> None:
    """One node over the default, through the CLI: exit 1, one line, nothing written."""
    limit = OnnxLimits().max_nodes
    path = tmp_path / "many.onnx"
    path.write_bytes(repeated_nodes(limit + 1))
    assert len(onnx.load(str(path)).graph.node) == limit + 1
    res = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1, res.output
    assert f"max_nodes={limit}" in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.onnx"]


def test_graph_nesting_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "deep.onnx"
    onnx.save(nested(5), str(path))
    with pytest.raises(LoadError, match="nested 5 deep exceed the limit max_depth=4"):
        load_onnx(path, OnnxLimits(max_depth=4))
    model = load_onnx(path)  # the default allows it
    assert [n.op_type for n in model.graph] == ["If"]


def test_a_tensor_declaring_more_than_the_file_stores_is_refused(tmp_path: Path) -> None:
    """1 GiB declared by dims, 16 bytes stored: refused before any allocation."""
    bomb = helper.make_tensor("w", F, [2, 2], vals=b"\0" * 16, raw=True)
    bomb.dims[:] = [1 << 18, 1 << 10]  # the helper checks sizes; a hostile writer does not
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", F, [1])],
        [helper.make_tensor_value_info("y", F, None)],
        initializer=[bomb],
    )
    path = tmp_path / "bomb.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    )
    with pytest.raises(
        LoadError, match=r"declare 1073741824 bytes, more than max_declared_ratio=16"
    ):
        load_onnx(path)


def test_ordinary_tensors_pass_the_ratio(tmp_path: Path) -> None:
    """Varint-packed int64 zeros (1 stored byte per 8 declared) and float data load."""
    ints = helper.make_tensor("i", TensorProto.INT64, [4096], vals=[0] * 4096)  # int64_data
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"]), helper.make_node("Identity", ["i"], ["j"])],
        "g",
        [helper.make_tensor_value_info("x", F, [64, 64])],
        [helper.make_tensor_value_info("y", F, [64, 64]), helper.make_tensor_value_info("j", TensorProto.INT64, [4096])],
        initializer=[w, ints],
    )  # fmt: skip
    path = tmp_path / "ok.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    model = load_onnx(path)
    assert set(model.graph.initializers) == {"w", "i"}


def test_cli_onnx_limit_lowers_and_raises_a_limit(tmp_path: Path) -> None:
    """--onnx-limit KEY=VALUE sets the limit the refusal names (convert and inspect); a bad key or
    value is a usage error."""
    path = tmp_path / "chain.onnx"
    onnx.save(chain(20), str(path))
    res = CliRunner().invoke(main, ["inspect", str(path), "--onnx-limit", "max_nodes=10"])
    assert res.exit_code == 1 and "max_nodes=10" in res.output and "--onnx-limit" in res.output
    res = CliRunner().invoke(main, ["inspect", str(path), "--onnx-limit", "max_nodes=20"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["convert", str(path), "-p", "fuse-norm", "-o", str(tmp_path / "o.onnx"),
                                    "--onnx-limit", "max_nodes=10"])
    assert res.exit_code == 1 and "max_nodes=10" in res.output
    assert not (tmp_path / "o.onnx").exists()
    for bad in ("nodes=5", "max_nodes=many", "max_depth=0"):
        res = CliRunner().invoke(main, ["inspect", str(path), "--onnx-limit", bad])
        assert res.exit_code == 2 and "--onnx-limit" in res.output and len(res.output.strip().splitlines()) == 1

"""Embedding tables decode only the rows a run looks up, with the same numbers as decoding
the whole table."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from conftest import op_count, outputs
from test_cli import invoke

TABLE = """
<ir_version: 8, opset_import: ["" : 17]>
embed (int64[batch, sequence] ids) => (float[batch, sequence, 8] y) {
    rows = Gather(table, ids)
    y = MatMul(rows, w)
}
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "embed.onnx"
    onnx.save(graphs.parsed(TABLE, {"table": (100, 64), "w": (64, 8)}), path)
    return path


FEEDS = {"ids": np.random.default_rng(0).integers(0, 100, size=(3, 7))}


@pytest.mark.parametrize("args, form", [
    (["--bits", 8], "Mul"),
    (["--bits", 8, "--asymmetric"], "Mul"),
    (["--bits", 8, "--granularity", "block", "--block-size", 16], "DequantizeLinear"),
    (["--bits", 4, "--granularity", "block", "--block-size", 16], "GatherBlockQuantized"),
    (["--bits", 4, "--granularity", "block", "--block-size", 32, "--asymmetric"], "GatherBlockQuantized"),
    (["--bits", 4], "GatherBlockQuantized"),  # one scale per row of 64: a block as long as the row
])
def test_gathered_rows_decode_like_the_whole_table(tmp_path, source, args, form):
    rows, whole = tmp_path / "rows.onnx", tmp_path / "whole.onnx"
    # float compute in the MatMulNBits the onnxruntime target writes for the MatMul
    assert invoke("compress", source, *args, "--accuracy-level", 0, "-o", rows, "-q", "--no-check").exit_code == 0
    assert invoke("compress", source, *args, "--target", "portable", "-o", whole, "-q", "--no-check").exit_code == 0
    graph = onnx.load(rows).graph
    table_decoders = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("table")]
    assert all(n.input[0] not in {i.name for i in graph.initializer} for n in table_decoders)  # no whole-table decode
    assert op_count(rows, form) >= 1
    # the same values; the portable graph's positive scales take zero points, which
    # onnxruntime's DequantizeLinear folds into its arithmetic in another order
    np.testing.assert_allclose(outputs(rows, FEEDS, 0)["y"], outputs(whole, FEEDS, 0)["y"], rtol=1e-6, atol=1e-6)


def test_portable_target_uses_standard_operators_only(tmp_path, source):
    out = tmp_path / "p.onnx"
    assert invoke("compress", source, "--bits", 4, "--granularity", "block", "--block-size", 16, "--target", "portable",
                  "-o", out, "-q").exit_code == 0
    assert {n.domain for n in onnx.load(out).graph.node} <= {"", "ai.onnx"}


def test_tied_table_keeps_one_decode(tmp_path):
    source = tmp_path / "decoder.onnx"
    onnx.save(graphs.decoder(), source)
    for target in ("onnxruntime", "portable"):  # one scale per row: no packed operator takes it
        out = tmp_path / f"{target}.onnx"
        assert invoke("compress", source, "--bits", 8, "--target", target, "-o", out, "-q").exit_code == 0
        graph = onnx.load(out).graph
        assert sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("embed")) == 1


@pytest.mark.parametrize("args", [["--bits", 8], ["--bits", 8, "--asymmetric"], ["--bits", 4], ["--bits", 4, "--asymmetric"]])
def test_tied_table_is_packed_once_for_both_readers(tmp_path, args):
    from onnxcomp.stored_weights import stored_weights
    import onnx_ir as ir

    source, packed, portable = tmp_path / "decoder.onnx", tmp_path / "packed.onnx", tmp_path / "portable.onnx"
    onnx.save(graphs.decoder(), source)
    blocks = ["--granularity", "block", "--block-size", 16]
    assert invoke("compress", source, *args, *blocks, "--accuracy-level", 0, "-o", packed, "-q", "--no-check").exit_code == 0
    assert invoke("compress", source, *args, *blocks, "--target", "portable", "-o", portable, "-q", "--no-check").exit_code == 0
    graph = onnx.load(packed).graph
    assert op_count(packed, "GatherBlockQuantized") == 1
    assert len([n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("embed")]) == 1
    assert not [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("embed")]
    table = [i for i in graph.initializer if i.name.startswith("embed")]
    assert sum(numpy_helper.to_array(i).size for i in table if i.data_type == onnx.TensorProto.UINT8) <= 32 * 16 + 32
    feeds = graphs.decoder_feeds()
    expected, got = outputs(portable, feeds, 0), outputs(packed, feeds, 0)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    decoded = {w.weight.shape: w.weight for w in stored_weights(ir.load(str(packed)).graph)}
    reference = {w.weight.shape: w.weight for w in stored_weights(ir.load(str(portable)).graph)}
    np.testing.assert_array_equal(decoded[(16, 32)].T, reference[(32, 16)])  # the same codes and scales


@pytest.mark.parametrize("args", [["--bits", 8], ["--bits", 8, "--asymmetric", "--granularity", "block", "--block-size", 16],
                                  ["--bits", 4, "--granularity", "block", "--block-size", 32, "--asymmetric"]])
def test_inspect_decodes_gathered_tables_as_the_portable_graph_stores_them(tmp_path, source, args):
    from onnxcomp.stored_weights import stored_weights
    import onnx_ir as ir

    rows, whole = tmp_path / "rows.onnx", tmp_path / "whole.onnx"
    assert invoke("compress", source, *args, "-o", rows, "-q", "--no-check").exit_code == 0
    assert invoke("compress", source, *args, "--target", "portable", "-o", whole, "-q", "--no-check").exit_code == 0
    found = {kind: sorted((w.weight for w in stored_weights(ir.load(str(path)).graph)), key=lambda w: w.shape)
             for kind, path in (("rows", rows), ("whole", whole))}
    assert len(found["rows"]) == len(found["whole"]) == 2  # the table and the MatMul, nothing else
    for gathered, whole_table in zip(found["rows"], found["whole"]):
        np.testing.assert_array_equal(gathered, whole_table)
    listed = invoke("inspect", rows, "--json")
    assert listed.exit_code == 0 and len(json.loads(listed.output)["layers"]) == 2

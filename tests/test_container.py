"""The .onnxc container: exact round trips, size near the entropy bound, and every damaged
file refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcomp import QuantConfig
from onnxcomp.pipeline import compress_model
from onnxcomp.container.format import ContainerError, describe, from_symbols, pack, to_symbols, unpack
from onnxcomp.modelio import load_model, save_model

from conftest import MODELS
from test_cli import _one_line_error, invoke


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.onnx")), ids=lambda p: p.name)
def test_round_trip_is_byte_identical_for_bundled_models(path):
    data = path.read_bytes()
    assert unpack(pack(data)) == data


@pytest.fixture(scope="module")
def quantized_minilm(minilm, tmp_path_factory):
    paths = {}
    for bits in (8, 4, 2):
        model, _ = compress_model(load_model(minilm), QuantConfig(bits=bits))
        paths[bits] = tmp_path_factory.mktemp("q") / f"minilm.q{bits}.onnx"
        save_model(model, paths[bits])
    return paths


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_minilm_round_trip_and_entropy_bound(quantized_minilm, bits):
    data = quantized_minilm[bits].read_bytes()
    blob = pack(data)
    assert unpack(blob) == data
    infos, _ = describe(blob)
    # MatMulNBits hold their codes packed in bytes, coded as 8-bit symbols
    assert len(infos) >= 39 and bits in {i.bits for i in infos} and {i.bits for i in infos} <= {bits, 8}
    coded = sum(i.stored_bytes for i in infos)
    bound = sum(i.entropy_bits * i.elements / 8 for i in infos)
    assert coded <= bound * 1.01  # the stored probability models included
    assert len(blob) < len(data)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symbols_round_trip(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 7, 64, 1001):
        symbols = rng.integers(0, 1 << bits, count)
        packed = from_symbols(symbols, bits)
        assert len(packed) == -(-count * bits // 8)
        np.testing.assert_array_equal(to_symbols(packed, bits, count), symbols)


@pytest.fixture(scope="module")
def small_container(tmp_path_factory):
    model, _ = compress_model(load_model(MODELS / "digits_cnn.onnx"), QuantConfig(bits=4))
    path = tmp_path_factory.mktemp("c") / "digits.q4.onnx"
    save_model(model, path)
    return path.read_bytes(), pack(path.read_bytes())


def test_truncations_are_refused(small_container):
    _, blob = small_container
    for length in sorted({0, 1, 5, 6, 7, 10, 14, 15, len(blob) // 3, len(blob) // 2, len(blob) - 1}):
        with pytest.raises(ContainerError):
            unpack(blob[:length])


def test_byte_flips_at_1000_positions_are_refused(small_container):
    _, blob = small_container
    rng = np.random.default_rng(0)
    for position in rng.choice(len(blob), size=min(1000, len(blob)), replace=False):
        damaged = bytearray(blob)
        damaged[position] ^= int(rng.integers(1, 256))
        with pytest.raises(ContainerError):
            unpack(bytes(damaged))


def test_foreign_files_are_refused():
    with pytest.raises(ContainerError, match="not an onnxcomp container"):
        unpack((MODELS / "digits_cnn.onnx").read_bytes())
    with pytest.raises(ContainerError, match="not a serialized ONNX model"):
        pack(b"\xff" * 64)


def test_cli_pack_unpack_inspect(tmp_path, small_container):
    data, _ = small_container
    source = tmp_path / "m.onnx"
    source.write_bytes(data)
    assert invoke("pack", source, "-o", tmp_path / "m.onnxc").exit_code == 0
    result = invoke("unpack", tmp_path / "m.onnxc", "-o", tmp_path / "back.onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back.onnx").read_bytes() == data
    table = invoke("inspect", tmp_path / "m.onnxc").output
    assert "entropy bits/weight" in table and "10.weight_q" in table
    damaged = bytearray((tmp_path / "m.onnxc").read_bytes())
    damaged[-5] ^= 0xFF
    (tmp_path / "bad.onnxc").write_bytes(bytes(damaged))
    _one_line_error(invoke("unpack", tmp_path / "bad.onnxc", "-o", tmp_path / "x.onnx"), "checksum", "corrupted")
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob(".onnxcomp-*"))  # nothing half-written
    _one_line_error(invoke("unpack", source, "-o", tmp_path / "y.onnx"), "not an onnxcomp container")


def test_compress_entropy_code_writes_a_container_that_unpacks_to_the_qdq_model(tmp_path):
    import json

    out, report = tmp_path / "d.onnxc", tmp_path / "r.json"
    result = invoke("compress", MODELS / "digits_cnn.onnx", "--bits", 4, "--entropy-code", "-o", out, "--report-json", report, "-q")
    assert result.exit_code == 0, result.output
    totals = json.loads(report.read_text())["totals"]
    assert totals["container size"] == out.stat().st_size < totals["file size after"]
    assert invoke("unpack", out, "-o", tmp_path / "d.onnx").exit_code == 0
    qdq = tmp_path / "direct.onnx"
    assert invoke("compress", MODELS / "digits_cnn.onnx", "--bits", 4, "-o", qdq, "-q").exit_code == 0
    assert (tmp_path / "d.onnx").read_bytes() == qdq.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.onnxc", "direct.onnx", "r.json"]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzzed_containers_are_refused(small_container, data):
    """Truncation at any length, and any one or more byte changes anywhere."""
    _, blob = small_container
    damaged = bytearray(blob[: data.draw(st.integers(0, len(blob)), label="length")])
    for _ in range(data.draw(st.integers(0 if len(damaged) < len(blob) else 1, 4), label="flips")):
        if damaged:
            position = data.draw(st.integers(0, len(damaged) - 1), label="position")
            damaged[position] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(ContainerError):
        unpack(bytes(damaged))


def test_inference_session_decodes_in_memory(tmp_path, small_container):
    import onnxcomp
    from onnxcomp.runtime import make_session, run

    data, blob = small_container
    (tmp_path / "m.onnx").write_bytes(data)
    (tmp_path / "m.onnxc").write_bytes(blob)
    feeds = {"image": np.load(MODELS / "digits_eval.npz")["image"][:32]}
    expected = run(make_session(tmp_path / "m.onnx"), feeds)["logits"]
    for name in ("m.onnxc", "m.onnx"):
        for fold in (False, None):  # None: weight-only, so folded to float weights at load
            session = onnxcomp.InferenceSession(tmp_path / name, fold_weights=fold)
            np.testing.assert_allclose(session.run(["logits"], feeds)[0], expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnxc"]  # nothing written
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x40
    (tmp_path / "bad.onnxc").write_bytes(bytes(damaged))
    with pytest.raises(ContainerError, match="corrupted"):
        onnxcomp.InferenceSession(tmp_path / "bad.onnxc")


def test_external_data_round_trip_and_session(tmp_path, small_container):
    """A quantized model whose every tensor lives in an external data file: the container
    holds both files, unpacks both byte for byte, and runs from memory."""
    import onnx

    import onnxcomp
    from onnxcomp.container.files import pack_file, unpack_file
    from onnxcomp.runtime import make_session, run

    data, _ = small_container
    source = tmp_path / "src"
    (source / "weights").mkdir(parents=True)
    onnx.save(onnx.load_from_string(data), source / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights/m.bin", size_threshold=0)
    before, after = pack_file(source / "m.onnx", tmp_path / "m.onnxc")
    assert after < before
    infos, toc = describe((tmp_path / "m.onnxc").read_bytes())
    assert [f.name for f in toc.files[1:]] == ["weights/m.bin"] and len(infos) == 6
    out = tmp_path / "out"
    out.mkdir()
    unpack_file(tmp_path / "m.onnxc", out / "back.onnx")
    assert (out / "back.onnx").read_bytes() == (source / "m.onnx").read_bytes()
    assert (out / "weights" / "m.bin").read_bytes() == (source / "weights" / "m.bin").read_bytes()
    feeds = {"image": np.load(MODELS / "digits_eval.npz")["image"][:16]}
    expected = run(make_session(source / "m.onnx"), feeds)["logits"]
    got = onnxcomp.InferenceSession(tmp_path / "m.onnxc", fold_weights=False).run(["logits"], feeds)[0]
    np.testing.assert_array_equal(got, expected)
    (source / "weights" / "m.bin").unlink()
    with pytest.raises(Exception, match="m.bin"):
        pack_file(source / "m.onnx", tmp_path / "n.onnxc")


def test_chunks_with_their_own_models_when_distributions_differ():
    """Two halves with different symbol distributions: one model per chunk beats the shared one."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(-8, 0, 1 << 20), rng.integers(0, 8, 1 << 20)]).astype(np.int8)
    tensor = helper.make_tensor("w", TensorProto.INT8, codes.shape, codes.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, codes.shape)], [tensor])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    blob = pack(data)
    assert unpack(blob) == data
    (info,), _ = describe(blob)
    assert info.models == "chunk" and info.elements == 2 << 20
    assert 8 * info.stored_bytes / info.elements < 0.9 * info.entropy_bits  # below the per-tensor bound


def test_only_weight_only_models_are_folded(tmp_path):
    import onnx

    from onnxcomp.calibration.analysis import Calibration
    from onnxcomp.session import weight_only

    for options, expected in (({"bits": 4}, True), ({"bits": 8, "act_bits": 8}, False)):
        model, _ = compress_model(load_model(MODELS / "digits_cnn.onnx"), QuantConfig(**options),
                            calibration=Calibration(MODELS / "digits_calib.npz"))
        save_model(model, tmp_path / "q.onnx")
        assert weight_only(onnx.load(tmp_path / "q.onnx")) is expected
    assert not weight_only(onnx.load(MODELS / "digits_cnn.onnx"))


def test_parallel_decoding_gives_the_same_bytes(monkeypatch, quantized_minilm):
    """Chunks decoded in worker processes (forced here; by default only for large models)."""
    from onnxcomp.container import format as container_format

    data = quantized_minilm[4].read_bytes()
    blob = pack(data)
    monkeypatch.setattr(container_format, "PARALLEL_MIN", 1)
    assert container_format._ChunkDecoder(2).workers == (os.cpu_count() if (os.cpu_count() or 1) > 1 else 1)
    assert unpack(blob) == data

"""Hostile and unlucky inputs: crafted containers (valid checksums, lying tables), paths that
would overwrite what is read, broken data files, signals. Each is refused in one line,
writes nothing outside its output folder, and leaves the input as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import onnx
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import graphs
from crafted import CRAFTED, craft, join, split
import onnxcomp
from conftest import MODELS, ROOT
from onnxcomp.container.format import ContainerError, pack, pack_to, read_toc, unpack
from test_cli import _one_line_error, invoke

DIGITS = MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    path = tmp_path_factory.mktemp("q4") / "digits.q4.onnx"
    assert invoke("compress", DIGITS, "--bits", 4, "-o", path, "-q").exit_code == 0
    return path


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_tables_are_refused_before_decoding(tmp_path, q4, name):
    blob = craft(pack(q4.read_bytes()), CRAFTED[name])
    with pytest.raises(ContainerError):
        unpack(blob)
    path = tmp_path / "crafted.onnxc"
    path.write_bytes(blob)
    _one_line_error(invoke("unpack", path, "-o", tmp_path / "out.onnx"))
    _one_line_error(invoke("inspect", path))
    with pytest.raises(ContainerError):
        onnxcomp.InferenceSession(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.onnxc"]


def test_table_that_expands_past_its_cap_is_refused():
    bomb = zstandard.ZstdCompressor(level=19).compress(b" " * ((1 << 26) + 10))  # 64 MiB of spaces, a few kB coded
    blob = join(bomb, b"")
    assert len(blob) < 100_000
    with pytest.raises(ContainerError, match="expands beyond"):
        read_toc(blob)


def test_skeleton_that_decompresses_past_its_declared_size_is_refused(tmp_path, q4):
    blob = pack(q4.read_bytes())
    toc, sections = split(blob)
    skeleton = next(s for s in toc["sections"] if s["kind"] == "skeleton")
    start = sum(s["length"] for s in toc["sections"][: toc["sections"].index(skeleton)])
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))  # 256 MiB of zeros in a few kB
    sections = sections[:start] + bomb + sections[start + skeleton["length"] :]
    skeleton.update(length=len(bomb), crc32=zlib.crc32(bomb))
    path = tmp_path / "bomb.onnxc"
    path.write_bytes(join(zstandard.ZstdCompressor().compress(json.dumps(toc).encode()), sections))
    _one_line_error(invoke("unpack", path, "-o", tmp_path / "out.onnx"), "more bytes than its table declares")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.onnxc"]


@pytest.fixture(scope="module")
def with_external(tmp_path_factory, q4):
    folder = tmp_path_factory.mktemp("ext")
    onnx.save(onnx.load(q4), folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out = folder / "m.onnxc"
    assert invoke("pack", folder / "m.onnx", "-o", out).exit_code == 0
    return out.read_bytes()


@pytest.mark.parametrize("name", ["", ".", "a" * 300, "bad\0name", "../escape.data", "/tmp/abs.data", "sub/../x", "a\\b"])
def test_external_file_names_that_cannot_be_written_are_refused(tmp_path, with_external, name):
    blob = craft(with_external, lambda toc: toc["files"][0].__setitem__("name", name))
    path = tmp_path / "c.onnxc"
    path.write_bytes(blob)
    out = tmp_path / "out"
    out.mkdir()
    _one_line_error(invoke("unpack", path, "-o", out / "m.onnx"))
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c.onnxc", "out"]


def test_external_file_named_like_the_output_is_refused(tmp_path, with_external):
    path = tmp_path / "c.onnxc"
    path.write_bytes(craft(with_external, lambda toc: toc["files"][0].__setitem__("name", "m.onnx")))
    _one_line_error(invoke("unpack", path, "-o", tmp_path / "m.onnx"), "named like the output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnxc"]


def test_session_refuses_external_data_the_container_does_not_hold(tmp_path, monkeypatch):
    # A model whose float weight names "secret.bin", packed without that file: onnxruntime
    # would read it from the working directory.
    model = graphs.masked()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", str(16 * 8 * 4))):
        tensor.external_data.add(key=key, value=value)
    out = io.BytesIO()
    pack_to(out, model.SerializeToString(), {})
    (tmp_path / "secret.bin").write_bytes(np.ones(16 * 8, np.float32).tobytes())
    (tmp_path / "c.onnxc").write_bytes(out.getvalue())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ContainerError, match="does not hold"):
        onnxcomp.InferenceSession(tmp_path / "c.onnxc")


def test_session_refuses_to_expand_far_beyond_the_container(tmp_path, q4, monkeypatch):
    import onnxcomp.session as session

    monkeypatch.setattr(session, "EXPANSION_ALLOWANCE", 0)
    path = tmp_path / "m.onnxc"
    path.write_bytes(pack(q4.read_bytes()))
    monkeypatch.setattr(session, "MAX_EXPANSION", 1)  # the real container expands ~1.3x
    with pytest.raises(ContainerError, match="onnxcomp unpack"):
        onnxcomp.InferenceSession(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.one_of(st.sampled_from(["size", "sections", "files", "version"]), st.integers(0, 12)), max_size=5),
       value=st.one_of(st.integers(-2**70, 2**70), st.text(max_size=20), st.none(), st.lists(st.integers(), max_size=3),
                       st.floats(allow_nan=True)))
def test_fuzzed_tables_decode_exactly_or_are_refused(q4, path, value):
    """Any change to any field of a valid table: the container decodes to the original
    bytes, or is refused with ContainerError; never another exception."""
    data = q4.read_bytes()

    def mutate(toc):
        target = toc
        for key in path[:-1]:
            if isinstance(target, dict) and isinstance(key, str) and key in target:
                target = target[key]
            elif isinstance(target, list) and isinstance(key, int) and key < len(target):
                target = target[key]
        last = path[-1] if path else "size"
        if isinstance(target, dict):
            target[last if isinstance(last, str) else next(iter(target))] = value
        elif isinstance(target, list) and target:
            target[last % len(target) if isinstance(last, int) else 0] = value

    blob = craft(_packed(data), mutate)
    try:
        assert unpack(blob) == data
    except ContainerError:
        pass


_PACKED: dict = {}


def _packed(data: bytes) -> bytes:
    if data not in _PACKED:
        _PACKED[data] = pack(data)
    return _PACKED[data]


# --- paths: nothing read is ever written --------------------------------------------------


def test_output_data_file_equal_to_the_inputs_data_file_is_refused(tmp_path):
    # torch writes model.onnx + model.onnx.data; "compress model_fp32.onnx -o model.onnx"
    # would write model.onnx.data, the input's own weights.
    onnx.save(onnx.load(DIGITS), tmp_path / "model_fp32.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    data = tmp_path / "model.onnx.data"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    _one_line_error(invoke("compress", tmp_path / "model_fp32.onnx", "--bits", 4, "-o", tmp_path / "model.onnx"),
                    "model.onnx.data", "read from")
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.data", "model_fp32.onnx"]


def test_report_json_naming_the_input_is_refused(tmp_path):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(DIGITS.read_bytes())
    _one_line_error(invoke("compress", copy, "-o", tmp_path / "q.onnx", "--report-json", copy), "is the input file")
    assert copy.read_bytes() == DIGITS.read_bytes() and not (tmp_path / "q.onnx").exists()
    _one_line_error(invoke("compress", copy, "-o", tmp_path / "q.onnx", "--report-json", tmp_path / "q.onnx"), "two outputs")


def test_report_json_in_a_missing_folder_is_refused_before_work(tmp_path):
    _one_line_error(invoke("compress", DIGITS, "-o", tmp_path / "q.onnx", "--report-json", tmp_path / "no" / "r.json"),
                    "does not exist")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _one_line_error(invoke("compress", DIGITS, "-o", folder / "q.onnx"), "not writable")
    finally:
        folder.chmod(0o700)


def test_read_only_output_folder_as_root_is_an_os_error_in_one_line(tmp_path, monkeypatch):
    import onnxcomp.modelio as modelio

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "q.onnx"))

    monkeypatch.setattr(modelio.ir, "save", refuse)  # after all the work is done
    _one_line_error(invoke("compress", DIGITS, "-o", tmp_path / "q.onnx"), "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_is_refused_before_work(tmp_path, monkeypatch):
    import shutil

    from onnxcomp import modelio

    monkeypatch.setattr(modelio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    _one_line_error(invoke("compress", DIGITS, "-o", tmp_path / "q.onnx"), "free")
    assert list(tmp_path.iterdir()) == []


def test_outputs_follow_the_umask(tmp_path, q4):
    old = os.umask(0o022)
    try:
        invoke("pack", q4, "-o", tmp_path / "m.onnxc")
        invoke("unpack", tmp_path / "m.onnxc", "-o", tmp_path / "m.onnx")
        invoke("compress", DIGITS, "-o", tmp_path / "q.onnx", "--report-json", tmp_path / "r.json", "-q")
    finally:
        os.umask(old)
    for name in ("m.onnxc", "m.onnx", "q.onnx", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --- broken data and models: one line each --------------------------------------------


def test_npy_whose_header_claims_more_rows_than_it_holds(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    good = np.zeros((4, 1, 8, 8), np.float32)
    raw = io.BytesIO()
    np.save(raw, good)
    header = raw.getvalue().replace(b"(4, 1, 8, 8)", b"(9, 1, 8, 8)")
    (folder / "x.npy").write_bytes(header)
    _one_line_error(invoke("compress", DIGITS, "--act-bits", 8, "--calib", folder, "-o", tmp_path / "o.onnx", "-q"), "x.npy")


def test_npz_with_a_bad_crc(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, image=np.random.default_rng(0).normal(size=(8, 1, 8, 8)).astype(np.float32))
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the stored array: its CRC no longer matches
    path.write_bytes(bytes(data))
    _one_line_error(invoke("compress", DIGITS, "--act-bits", 8, "--calib", path, "-o", tmp_path / "o.onnx", "-q"), "c.npz")


def test_png_declaring_a_huge_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    png = bytearray(b"\x89PNG\r\n\x1a\n")
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    png += struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (folder / "big.png").write_bytes(bytes(png))
    _one_line_error(invoke("compress", DIGITS, "--act-bits", 8, "--calib", folder, "-o", tmp_path / "o.onnx", "-q"), "big.png")


def test_weight_with_a_zero_dimension(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 0] x) => (float[N, 4] y) {
        y = MatMul(x, w)
    }
    """
    model = graphs.parsed(text, {"w": np.zeros((0, 4), np.float32)})
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke("compress", tmp_path / "m.onnx", "--bits", 4, "-o", tmp_path / "o.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_bfloat16_model_compresses_without_a_traceback(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (bfloat16[N, 16] x) => (bfloat16[N, 8] y) {
        y = MatMul(x, w)
    }
    """
    import ml_dtypes

    w = np.random.default_rng(0).normal(size=(16, 8)).astype(ml_dtypes.bfloat16)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke("compress", tmp_path / "m.onnx", "--bits", 8, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and (tmp_path / "o.onnx").is_file()


def test_opset_beyond_what_onnx_knows_is_refused(tmp_path):
    model = onnx.load(DIGITS)
    model.opset_import[0].version = 99
    onnx.save(model, tmp_path / "m.onnx")
    _one_line_error(invoke("compress", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx"), "opset 99")


def test_click_usage_errors_are_one_line():
    _one_line_error(invoke("compress"), "MODEL")
    _one_line_error(invoke("compress", DIGITS, "--bits", "four"), "--bits")


# --- signals ------------------------------------------------------------------------------


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigterm_during_compress_leaves_nothing(tmp_path, delay):
    calib = MODELS / "digits_calib.npz"
    process = _start(["compress", DIGITS, "--bits", 4, "--magr", "--magr-iters", 200, "--rounding", "optq", "--calib", calib,
                      "-o", tmp_path / "q.onnx", "-q"], ROOT)
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:  # it finished first: then the whole output is there
        assert (tmp_path / "q.onnx").is_file()
        return
    # Before the handler is in place (Python still importing) SIGTERM ends it at once (-15),
    # with nothing written yet; after, it unwinds (130) and removes its temporary files.
    # The model may have been renamed into place just before the signal: then it is whole.
    assert process.returncode == -signal.SIGTERM or (process.returncode == 130 and b"interrupted" in err), err[-2000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert left in ([], ["q.onnx"]), left
    if left:
        onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


def test_decoder_workers_die_with_their_parent(tmp_path, monkeypatch, q4):
    # Force worker processes on a small container, kill the parent hard, check the workers go.
    path = tmp_path / "m.onnxc"
    path.write_bytes(pack(q4.read_bytes()))
    script = (
        "import sys, time, onnxcomp.container.format as f\n"
        "f.PARALLEL_MIN = 0\n"
        "original = f.decode_symbols\n"
        "f.decode_symbols = lambda *a: (time.sleep(60), original(*a))[1]\n"
        "f.unpack(open(sys.argv[1], 'rb').read())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(path)], start_new_session=True)
    time.sleep(3)
    children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes started"
    parent.kill()
    parent.wait()
    time.sleep(1)
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    for pid in alive:  # not to leave them behind when the check fails
        os.kill(int(pid), signal.SIGKILL)
    assert alive == []


# --- the same bytes on any machine --------------------------------------------------------


def _compressed_digest(tmp_path, threads: int, args) -> str:
    out = tmp_path / f"t{threads}.onnx"
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "onnxcomp.cli", "compress", *map(str, args), "-o", str(out), "-q"],
                   check=True, env=env, cwd=ROOT)
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("extra", [[], ["--magr"]], ids=["optq", "magr+optq"])
def test_optq_codes_do_not_depend_on_the_thread_count_digits(tmp_path, extra):
    args = [DIGITS, "--bits", 4, "--rounding", "optq", "--calib", MODELS / "digits_calib.npz", *extra]
    assert _compressed_digest(tmp_path, 1, args) == _compressed_digest(tmp_path, 2, args)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--magr", "--magr-iters", 30]], ids=["optq", "magr+optq"])
def test_optq_codes_do_not_depend_on_the_thread_count_minilm(tmp_path, minilm, minilm_calib, extra):
    args = [minilm, "--bits", 4, "--rounding", "optq", "--calib", minilm_calib, *extra]
    assert _compressed_digest(tmp_path, 1, args) == _compressed_digest(tmp_path, 2, args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(min_size=0, max_size=40),
                      st.lists(st.sampled_from(["..", ".", "", "a", "m.onnx", "x.data", "/"]), max_size=4).map("/".join)))
def test_unpack_never_touches_a_path_outside_its_folder(tmp_path_factory, with_external, name):
    from onnxcomp.container.files import unpack_file

    root = tmp_path_factory.mktemp("p")
    (root / "out").mkdir()
    container = root / "c.onnxc"
    container.write_bytes(craft(with_external, lambda toc: toc["files"][0].__setitem__("name", name)))
    before = {p for p in root.rglob("*")}
    try:
        unpack_file(container, root / "out" / "m.onnx")
    except ContainerError:
        assert {p for p in root.rglob("*")} == before
        return
    written = {p for p in root.rglob("*")} - before
    assert written and all((root / "out") in p.parents for p in written), written

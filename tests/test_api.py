"""The Python API as a user meets it: one call, any form of model and calibration data,
the same errors as the command line, the options recorded in what it writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcomp
from conftest import MODELS, ROOT
from test_cli import _one_line_error, invoke

DIGITS = MODELS / "digits_cnn.onnx"
IMAGES = np.load(MODELS / "digits_calib.npz")["image"]


class Reader:
    """Any object with get_next(), as onnxruntime's CalibrationDataReader protocol has it."""

    def __init__(self):
        self.batches = iter([{"image": IMAGES[i : i + 16]} for i in range(0, 64, 16)])

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("form", ["path", "proto", "ir"])
def test_every_form_of_model_compresses_the_same(tmp_path, form):
    model = {"path": DIGITS, "proto": onnx.load(DIGITS), "ir": ir.load(str(DIGITS))}[form]
    result = onnxcomp.compress(model, tmp_path / "q.onnx", bits=4, granularity="block", block_size=16)
    assert result.path == tmp_path / "q.onnx" and result.report.totals["layers quantized"] == "6 of 6"
    reference = onnxcomp.compress(DIGITS, bits=4, granularity="block", block_size=16).model
    assert ir.to_proto(result.model).graph == ir.to_proto(reference).graph
    if form == "ir":
        assert "0.weight" in model.graph.initializers  # the caller's model is left as it was


@pytest.mark.parametrize("data", ["path", "iterable", "reader", "calibration"])
def test_every_form_of_calibration_data(data):
    given = {"path": str(MODELS / "digits_calib.npz"), "iterable": [{"image": IMAGES[i : i + 16]} for i in range(0, 64, 16)],
             "reader": Reader(), "calibration": onnxcomp.Calibration(str(MODELS / "digits_calib.npz"))}[data]
    result = onnxcomp.compress(DIGITS, bits=4, rounding="optq", calibration=given)
    assert all(r.output_error is not None for r in result.report.layers)  # OPTQ had real statistics


def test_errors_are_the_cli_ones():
    with pytest.raises(onnxcomp.OnnxcompError, match="unknown option"):
        onnxcomp.compress(DIGITS, bitz=4)
    with pytest.raises(onnxcomp.OnnxcompError, match="--bits 5"):
        onnxcomp.compress(DIGITS, bits=5)
    with pytest.raises(onnxcomp.OnnxcompError, match="cannot compress a dict"):
        onnxcomp.compress({"not": "a model"})


def test_options_and_versions_are_recorded(tmp_path):
    result = onnxcomp.compress(DIGITS, tmp_path / "q.onnx", bits=2, asymmetric=True)
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert json.loads(props["onnxcomp.options"]) == result.report.options
    assert result.report.options["bits"] == 2 and result.report.options["asymmetric"] is True
    assert props["onnxcomp.version"] == onnxcomp.__version__ and props["onnxcomp.onnxruntime"]
    assert json.loads(result.report.to_json())["versions"]["onnxcomp"] == onnxcomp.__version__


def test_config_file_round_trip_gives_the_same_bytes(tmp_path):
    args = [DIGITS, "--bits", 4, "--granularity", "block", "--block-size", 16, "--rounding", "optq", "--calib",
            MODELS / "digits_calib.npz", "--asymmetric"]
    dumped = invoke("compress", *args, "-o", tmp_path / "a.onnx", "--dump-config")
    assert dumped.exit_code == 0 and not (tmp_path / "a.onnx").exists()
    (tmp_path / "run.toml").write_text(dumped.output)
    assert invoke("compress", *args, "-o", tmp_path / "a.onnx", "-q").exit_code == 0
    assert invoke("compress", DIGITS, "--config", tmp_path / "run.toml", "-o", tmp_path / "b.onnx").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    (tmp_path / "bad.toml").write_text('bitz = 4\n')
    _one_line_error(invoke("compress", DIGITS, "--config", tmp_path / "bad.toml"), "unknown option", "bitz")


def test_readme_from_python_examples_run(tmp_path, monkeypatch):
    """The README's "From Python" examples, run as they are written, from a copy of models/."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    (tmp_path / "models").symlink_to(MODELS)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_without_onnxruntime_the_error_names_the_extra_to_install(tmp_path, entry):
    """onnxruntime comes from one of two wheels (onnxcomp[cpu] or [gpu]); without either, one line says which."""
    call = {
        "cli": "from onnxcomp.cli import main; sys.argv = ['onnxcomp', 'compress', model, '-o', out]; main()",
        "api": "import onnxcomp\ntry:\n    onnxcomp.compress(model, out)\nexcept onnxcomp.OnnxcompError as err:\n"
               "    print('onnxcomp: error:', err); sys.exit(2)",
    }[entry]
    script = f"import sys\nsys.modules['onnxruntime'] = None  # as if no onnxruntime wheel were installed\n" \
             f"model, out = {str(DIGITS)!r}, {str(tmp_path / 'q.onnx')!r}\n{call}\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("onnxcomp: error: onnxruntime is not installed") and "onnxcomp[cpu]" in lines[0]
    assert not (tmp_path / "q.onnx").exists()


def test_readme_shows_no_image_by_a_relative_path():
    """The README is the package's long description: on the package index a relative image path breaks."""
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)|<img[^>]+src=\"([^\"]+)\"", (ROOT / "README.md").read_text())
    relative = [a or b for a, b in images if not (a or b).startswith("https://")]
    assert not relative, relative


def test_a_bits_plan_sets_each_named_layer_and_is_recorded(tmp_path):
    plan = {"/0/Conv": 8, "/14/Gemm": 0, "/17/Gemm": 2}
    result = onnxcomp.compress(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", bits=4, bits_plan=plan)
    rows = {r.name: r for r in result.report.layers}
    assert {name: rows[name].bits for name in plan} == {"/0/Conv": 8, "/14/Gemm": None, "/17/Gemm": 2}
    assert rows["/14/Gemm"].note == "kept float by the bit plan" and rows["/14/Gemm"].bytes_after == rows["/14/Gemm"].bytes_before
    assert all(r.bits == 4 for name, r in rows.items() if name not in plan)
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert json.loads(props["onnxcomp.options"])["bits_plan"] == plan
    with pytest.raises(onnxcomp.OnnxcompError, match="0 .float. or one of 2, 3, 4, 8"):
        onnxcomp.compress(MODELS / "digits_cnn.onnx", bits=4, bits_plan={"/0/Conv": 5})


def test_a_block_plan_sets_each_named_layers_blocks():
    result = onnxcomp.compress(MODELS / "digits_cnn.onnx", bits=4, granularity="block", block_size=16,
                               block_plan={"/14/Gemm": 64})
    rows = {r.name: r.granularity for r in result.report.layers}
    assert rows["/14/Gemm"] == "block64" and rows["/17/Gemm"] == "block16"
    assert result.report.options["block_plan"] == {"/14/Gemm": 64}
    with pytest.raises(onnxcomp.OnnxcompError, match="power of two"):
        onnxcomp.compress(MODELS / "digits_cnn.onnx", bits=4, block_plan={"/14/Gemm": 48})


def test_a_budget_through_the_api(tmp_path):
    budget = onnxcomp.Budget(size=25_000)
    result = onnxcomp.compress(MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", bits=4,
                               calibration=MODELS / "digits_calib.npz", budget=budget)
    assert 0.98 * 25_000 <= (tmp_path / "q.onnx").stat().st_size <= 25_000
    assert result.report.options["bits_plan"] and "bit allocation" in result.report.totals
    assert {r.name: r.bits for r in result.report.layers if r.bits} == {
        name: bits for name, bits in result.report.options["bits_plan"].items() if bits}
    with pytest.raises(onnxcomp.OnnxcompError, match="needs the model as a path"):
        onnxcomp.compress(onnx.load(MODELS / "digits_cnn.onnx"), tmp_path / "r.onnx", budget=budget)

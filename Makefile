# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MINILM := build/zoo/minilm/minilm.onnx

.PHONY: setup demo test minilm clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(MINILM): $(STAMP) scripts/export_minilm.py models/sentences_eval.txt models/sentences_calib.txt
	$(PY) scripts/export_minilm.py --out build/zoo/minilm

minilm: $(MINILM)

demo: $(STAMP)
	mkdir -p build/demo
	$(VENV)/bin/onnxcomp inspect models/digits_cnn.onnx
	$(VENV)/bin/onnxcomp compress models/digits_cnn.onnx --bits 4 -o build/demo/digits_cnn.q4.onnx --report-json build/demo/report.json
	$(VENV)/bin/onnxcomp verify models/digits_cnn.onnx build/demo/digits_cnn.q4.onnx --inputs models/digits_eval.npz --min-cosine 0.99
	$(VENV)/bin/onnxcomp compress models/digits_cnn.onnx --bits 8 --act-bits 8 --calib models/digits_calib.npz -o build/demo/digits_cnn.w8a8.onnx -q
	$(PY) scripts/digits_accuracy.py models/digits_cnn.onnx build/demo/digits_cnn.q4.onnx build/demo/digits_cnn.w8a8.onnx

test: $(STAMP) $(MINILM)
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV)

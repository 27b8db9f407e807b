# The two commands of the README. Both create their own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,onnx

.PHONY: venv test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"

# pytest exits 5 when it collected no test: that is a failure here, as is any failed test.
test: venv
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info sdk/*.egg-info

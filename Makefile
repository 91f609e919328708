# Two commands matter: `make demo` (the main job on the bundled real sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install step repeats the torch pin (constraints.txt): an unpinned resolve may replace
# the CPU build with a multi-GB CUDA one.
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO_DIR ?= runs/demo

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/python -m training.demo --output_dir $(DEMO_DIR)

bench: venv
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	$(BIN)/python bench/summarize.py

clean:
	rm -rf $(VENV) runs build *.egg-info

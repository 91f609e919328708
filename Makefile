# Two commands matter: `make demo` (the main job on the bundled real sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install step repeats the torch pin (constraints.txt): an unpinned resolve may replace
# the CPU build with a multi-GB CUDA one.
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO_DIR ?= runs/demo
# Where the torch wheel comes from: pip's own configuration by default (a local CPU wheel on the project's machines);
# elsewhere `make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build, not PyPI's CUDA one.
TORCH_INDEX ?=

.PHONY: venv test demo bench clean transformers-common-tests transformers-range

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/python -m training.demo --output_dir $(DEMO_DIR)

bench: venv
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	$(BIN)/python bench/summarize.py

# transformers' own common model tests (ModelTesterMixin, ConfigTester) on both models, from the sdist of the
# installed transformers release (needs PyPI; not part of `make test`, which skips them). See tests/transformers_common.
TF_SCRATCH ?= /tmp/stage2-transformers-common
transformers-common-tests: venv
	@set -e; v=$$($(BIN)/python -c 'import transformers; print(transformers.__version__)'); d=$(TF_SCRATCH)/$$v; \
	mkdir -p $$d; \
	[ -f $$d/transformers-$$v.tar.gz ] || $(BIN)/pip download --quiet --disable-pip-version-check \
		transformers==$$v --no-binary :all: --no-deps -d $$d; \
	[ -d $$d/transformers-$$v/tests ] || tar -xzf $$d/transformers-$$v.tar.gz -C $$d transformers-$$v/tests; \
	[ -d $$d/deps/parameterized ] || $(PIP) --target $$d/deps 'parameterized>=0.9'; \
	TRANSFORMERS_SDIST_DIR=$$d/transformers-$$v PYTHONPATH=$$d/deps $(BIN)/python -m pytest -q -p no:cacheprovider \
		-W ignore::pytest.PytestUnknownMarkWarning tests/transformers_common

# The trainer tests against the lowest and the highest transformers release setup.cfg allows, each in a scratch
# venv (needs PyPI; several minutes per version). Results: docs/transformers_compat.md.
transformers-range: venv
	$(BIN)/python tools/transformers_range.py

# What `make venv` and `make demo` made; not the rest of runs/ (runs/lowvr and other trainings of your own).
clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info

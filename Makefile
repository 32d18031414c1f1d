# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint install clean screenshot docs bench

# --no-cache-dir: the install is several GB (a CUDA build of torch); a second copy of every wheel in pip's
# cache is what a machine short of disk cannot afford, and the venv is made once.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# The desktop app on the default project; with no display (or without Qt's xcb libraries) main.py says why,
# names the apt-get line when libraries are missing, and trains the same project headless.
run: $(STAMP)
	$(PY) main.py examples/default.json

screenshot: $(STAMP)
	QT_QPA_PLATFORM=$${QT_QPA_PLATFORM:-offscreen} $(PY) -m app.screenshot docs/main_window.png

docs: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m app.object_names docs/object_names.md
	$(PY) -c 'from engine.config import write_readme_table; write_readme_table("README.md")'

# Static checks (settings in pyproject.toml); `make test` runs them first and stops on any finding.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Two test processes by default (TEST_WORKERS=0 runs them in this one); --dist loadfile keeps each test file in
# one process, so its module fixtures are built once.
TEST_WORKERS ?= 2
test: lint
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Every benchmark (minutes): docs/bench/results.json and results.md, and the table between the README's
# bench markers. `$(PY) -m bench --quick` is a smoke run; `--only NAME ...` picks benchmarks.
bench: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m bench

clean:
	rm -rf runs .pytest_cache build *.egg-info

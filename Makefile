# The README's two commands are `make demo` and `make test`; both create the venv when missing.
# Each installs only what it runs: the demo the `train` extra, the tests the `dev` extra.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: venv test bench clean demo format

venv: $(STAMP)

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Training, sampling and the demo's classifier (scikit-learn, in the `data` extra that `train`
# pulls in): no test tools, no evaluation or VAE libraries.
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[train]'
	touch $(DEMO_STAMP)

# Lint and format check first (ruff, configured in pyproject.toml; hadolint on the Dockerfile),
# then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	$(PY) -m pytest -q tests

# The main job on the embedded default (`arflow demo --help`): scikit-learn's digits as shards,
# trained by 2 CPU processes under the deepspeed launcher; then an EMA sample grid and the
# class-consistency of 1,000 samples. Re-running resumes from (or just re-reports) the last
# checkpoint.
DEMO_DATA ?= data/digits
DEMO_RUN  ?= runs/digits_cpu

demo: $(DEMO_STAMP)
	$(VENV)/bin/arflow demo --data $(DEMO_DATA) --run-dir $(DEMO_RUN)

# Apply the formatter and the safe lint fixes.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The README's two commands are `make demo` and `make test`; both create the venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: venv test bench clean demo format

venv: $(STAMP)

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Lint and format check first (ruff, configured in pyproject.toml), then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

# The main job on the embedded default: scikit-learn's digits as shards, trained by 2 CPU
# processes under the deepspeed launcher; then an EMA sample grid and the class-consistency of
# 1,000 samples. Re-running resumes from (or just re-reports) the last checkpoint.
DEMO_DATA ?= data/digits
DEMO_RUN  ?= runs/digits_cpu

demo: $(STAMP) $(DEMO_DATA)/manifest.json
	$(VENV)/bin/deepspeed --num_gpus 2 launchers/train.py --config configs/digits_cpu.json \
		--set data.url=$(DEMO_DATA) --set run.dir=$(DEMO_RUN) --resume auto
	$(PY) -m arflow.utils.digits_demo --config configs/digits_cpu.json --set run.dir=$(DEMO_RUN)
	@echo "outputs in $(DEMO_RUN): metrics.jsonl, checkpoints/, samples/, digits_grid.png, ema.safetensors, wandb/"

$(DEMO_DATA)/manifest.json: $(STAMP)
	$(PY) tools/make_shards.py digits --out $(DEMO_DATA) --image-size 8 --no-progress

# Apply the formatter and the safe lint fixes.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

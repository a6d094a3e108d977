# Every target bootstraps .venv with pip if it is missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Avoids a CPU-backend hang of jaxlib 0.10.x on larger vmapped programs (see
# docs/installation.md, "The CPU scheduler flag").
export XLA_FLAGS ?= --xla_cpu_enable_concurrency_optimized_scheduler=false

.PHONY: demo test test-oldest lint typecheck unit docs docs-build bench bench-quick clean

# The oldest JAX of the range declared in pyproject.toml, tested in its own venv.
OLDEST_JAX := 0.9.2
OLD_VENV := .venv-oldjax

$(BIN)/.bootstrapped: pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "$(PY) not found"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,docs,bench]"
	touch $@

demo: $(BIN)/.bootstrapped
	$(BIN)/python examples/kinetic_energy.py

lint: $(BIN)/.bootstrapped
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(BIN)/.bootstrapped
	$(BIN)/pyright

unit: $(BIN)/.bootstrapped
	$(BIN)/python -m pytest -n 2 -q

docs-build: $(BIN)/.bootstrapped
	@if [ -f mkdocs.yml ]; then $(BIN)/mkdocs build --strict; fi

test: lint typecheck unit docs-build

$(OLD_VENV)/.bootstrapped: pyproject.toml
	test -x $(OLD_VENV)/bin/python || $(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q "jax==$(OLDEST_JAX)" "jaxlib==$(OLDEST_JAX)" -e ".[dev]"
	touch $@

test-oldest: $(OLD_VENV)/.bootstrapped
	$(OLD_VENV)/bin/python -c "import jax; assert jax.__version__ == '$(OLDEST_JAX)', jax.__version__"
	$(OLD_VENV)/bin/python -m pytest -n 2 -q

docs: $(BIN)/.bootstrapped
	$(BIN)/mkdocs serve

bench: $(BIN)/.bootstrapped
	$(BIN)/python -m benchmarks.run

bench-quick: $(BIN)/.bootstrapped
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .venv-oldjax site .pytest_cache

# vlscale: `make demo` trains and evaluates the embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch that CI machines have on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install lint format test test-fast demo clean

SHAPES := data/shapes

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The embedded default: synthetic shapes shards (made once), the tiny SigLIP recipe, its results.
demo: install
	test -f $(SHAPES)/sizes.json || \
		$(BIN)/vlscale shards synthetic --out $(SHAPES) --train 20000 --val 512 --seed 0
	$(BIN)/vlscale train tiny_siglip
	$(BIN)/vlscale report runs/tiny_siglip

clean:
	rm -rf runs .pytest_cache .ruff_cache

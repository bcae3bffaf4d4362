# Two commands on a fresh machine with only Python and make:
#   make demo   — the main job end to end on embedded defaults
#   make test   — the test suite (what CI runs)
PY ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON := $(shell command -v $(PY))
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install demo test test-all check fmt bench sandbox clean browser

$(UV):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --quiet --extra bench
	@touch $@

install: $(VENV)/.synced

demo: install
	$(BIN)/stripe-sage demo

# The HTML report test renders the page in headless Chromium (Debian's package). Without
# root or a package mirror it checks the parsed page instead.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the report test checks the parsed HTML instead"

test: install browser
	$(BIN)/pytest -m "not slow" -q

test-all: install
	$(BIN)/pytest -q

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/stripe-sage bench sandbox --charges 100000
	$(BIN)/stripe-sage bench sandbox --charges 1000000 --days 365
	$(BIN)/stripe-sage bench pipeline --charges 10000

sandbox: install
	$(BIN)/stripe-sage sandbox

clean:
	rm -rf $(VENV) $(TOOLS) data .pytest_cache .mypy_cache .ruff_cache

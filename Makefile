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
# Byte-compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on the CI machines)
# every process would otherwise compile Prefect, GX, pandas... from source on each start
# (~10 s of CPU per process, and the tests start dozens).
export UV_COMPILE_BYTECODE := 1

.PHONY: install demo test test-unit test-all check fmt bench bench-smoke bench-large sandbox clean browser \
	serve ui deploy

$(UV):
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml devkit/pyproject.toml uv.lock Makefile
	$(UV) sync --frozen --quiet
	@touch $@

install: $(VENV)/.synced

demo: install
	$(BIN)/stripe-sage demo

# The HTML report test renders the page in headless Chromium (Debian's package). Without
# root or a package mirror it checks the parsed page instead.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the report test checks the parsed HTML instead"

# Three pytest workers on two cores, one test module each at a time (module fixtures stay per
# worker): most e2e time is waiting on Prefect servers and flow-run processes, so a third
# worker fills the cores while the others wait.
# The costliest modules start first (tests/helpers/scheduling.py, times from the last run).
# The tests write bytecode caches as Python does by default, even where the machine sets
# PYTHONDONTWRITEBYTECODE (as the CI machines do): otherwise each of the ~100 processes a run
# starts compiles the project's modules from source again, and each pytest worker rewrites
# and compiles every test module again (~15 s of CPU per run). __pycache__ is git-ignored.
NO_DONTWRITE := env -u PYTHONDONTWRITEBYTECODE
test: install browser
	$(NO_DONTWRITE) $(BIN)/pytest -m "not slow" -q -n 3 --dist loadfile --durations=25

# The unit tier alone (pure functions, no servers): under a minute, on both cores (one
# process took 80 s on a slower machine of this kind). Only tests/unit is collected:
# collecting the other tiers imports Prefect and the sandboxes for nothing.
test-unit: install
	$(NO_DONTWRITE) $(BIN)/pytest tests/unit -m unit -q -n 2

test-all: install
	$(BIN)/pytest -q

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Ours beside the floor (bare httpx) and dlt's rest_api source on the same sandbox: per-stage
# table, JSON and PNG under bench-results/ (README, Benchmarks). Stripe's test-mode limit.
bench: install
	$(BIN)/stripe-sage bench compare --charges 10000 --through load
	$(BIN)/stripe-sage bench compare --charges 100000 --through stage --dlt-format parquet
	$(BIN)/stripe-sage bench scale --sizes 10000,100000 --through stage --contenders floor,ours \
		--rate-limit 0 --client-rps 0 --out bench-results/unlimited

# What CI runs (untimed): every contender and stage at 300 charges.
bench-smoke: install
	$(BIN)/stripe-sage bench compare --charges 300 --through load --rate-limit 0 --client-rps 0 \
		--out bench-results/smoke

# On demand: the 1M-charge full run (every stage through the Sage load, per-stage peak RSS;
# no Stripe rate limit; about 1.5 h on 2 cores), then the extract+stage scaling curve to 1M.
bench-large: install
	$(BIN)/stripe-sage bench compare --charges 1000000 --days 365 --through load \
		--contenders ours --rate-limit 0 --client-rps 0 --out bench-results/large
	$(BIN)/stripe-sage bench scale --sizes 10000,100000,1000000 --through stage \
		--contenders floor,ours --rate-limit 0 --client-rps 0 --out bench-results/unlimited

sandbox: install
	$(BIN)/stripe-sage sandbox

# Day to day on one machine: Prefect server + UI (http://127.0.0.1:4200), every deployment
# on its schedule, the webhook receiver and the alerts. Ctrl-C stops it all.
serve: install
	$(BIN)/stripe-sage serve

# The same on embedded defaults (both sandboxes too), opening the UI in a browser.
ui: install
	$(BIN)/stripe-sage serve --with-sandboxes --open

# Register every deployment on PREFECT_API_URL's server for a process work pool.
deploy: install
	$(BIN)/prefect work-pool inspect stripe-sage >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create stripe-sage --type process
	$(BIN)/prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all

clean:
	rm -rf $(VENV) $(TOOLS) data .prefect .pytest_cache .mypy_cache .ruff_cache

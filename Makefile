# The README's two set-up commands: `make demo` and `make test`.
# Each creates or updates the virtual environment and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per extra installed: `make demo` installs the demo's, `make test` every tool's.
STAMP := $(VENV)/.installed-test

.PHONY: venv demo test test-repeat lint prometheus bench-xds clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

venv: $(STAMP)

demo: $(VENV)/.installed-demo,plot
	$(VENV)/bin/hybridlb demo

# Debian's prometheus for the tests that need a real one; installed when root and missing.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  else echo "prometheus missing and not root: tests that need it will be skipped"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check xds_server tests
	$(VENV)/bin/mypy

test: $(STAMP) prometheus lint
	$(VENV)/bin/pytest -q

# The suite N times in a clean clone of HEAD with BURN CPU burners beside it, each run's time
# and result printed (.ci/repeat). PYTEST_ARGS narrows it, e.g. PYTEST_ARGS=tests/unit.
N ?= 5
BURN ?= 0
test-repeat:
	.ci/repeat $(N) $(BURN) $(PYTEST_ARGS)

bench-xds: $(VENV)/.installed-bench
	$(VENV)/bin/hybridlb bench xds --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

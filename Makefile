# Every target sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install browser demo test test-slow lint bench clean device-emu

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,examples,cluster]"
	touch $(STAMP)

install: $(STAMP)

# The report test renders HTML in Debian's chromium; install it when missing (needs root, as in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ echo "installing Debian's chromium for the report test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/compress run examples/demo.yaml -o demo-out

lint: install
	$(BIN)/ruff check edgecompress compress export runtimes targets tests bench tools
	$(BIN)/python tools/typecheck.py

# pytest exits 5 when it collects nothing: treat that as a failure with a clear message.
test: lint browser
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# NNCF conflicts with our pins: give its own venv for the peer rows of quantune_real, e.g.
#   python3 -m venv /work/nncf-venv && /work/nncf-venv/bin/pip install nncf onnxruntime==1.32.0 onnx==1.23.2
#   make bench NNCF_PYTHON=/work/nncf-venv/bin/python
bench: install
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/runtimes.py
	$(BIN)/python bench/quantune.py
	$(BIN)/python bench/gaqat.py
	$(BIN)/python bench/jlcm.py
	$(BIN)/python bench/nm_sparsity.py
	$(BIN)/python bench/tune_rpc.py
	$(BIN)/python bench/regression_noise.py
	$(BIN)/python bench/quantune_cluster.py
	$(BIN)/python bench/quantune_real.py --threads 1 $(if $(NNCF_PYTHON),--peers-python $(NNCF_PYTHON))
	$(BIN)/python bench/tvm_int8.py
	$(BIN)/python bench/tvm_lite.py --threads 1 --tune 20m

# An emulated ARM64 device for CI (no phone): a Debian arm64 root run under qemu user mode, built
# once into the cache (apt-get installs qemu-user-static, debootstrap and the aarch64 cross compiler
# when missing; needs root). Then: compress device-server --emulate arm64 --port 9090 --key emu
device-emu: install
	$(BIN)/python tools/device_emu/build.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache

# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest runs MLX in-process, so it gets the fast BLAS through LD_PRELOAD (the `pudl` command re-execs itself).
PRELOAD = $$($(BIN)/python -m pudl.hardware --preload-path 2>/dev/null)

.PHONY: install demo test test-fast doctor clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@# Debian/Ubuntu: OpenBLAS makes MLX's CPU matmuls ~30x faster than the reference BLAS its wheel links.
	@if [ "$$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread; \
	  else echo "note: install OpenBLAS for fast MLX on CPU: sudo apt-get install libopenblas0-pthread"; fi; \
	fi
	@# Debian/Ubuntu: headless Chromium, for the test that renders a run's report.html (skipped without it).
	@if [ "$$(uname)" = Linux ] && ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: tests/test_report.py renders report.html in Chromium: sudo apt-get install chromium"; fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores).
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[cpu,test,server]"
	touch $@

demo: $(STAMP)
	$(BIN)/pudl run recipes/demo.toml

test: $(STAMP)
	LD_PRELOAD=$(PRELOAD) $(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	LD_PRELOAD=$(PRELOAD) $(BIN)/python -m pytest -q -ra -m "not integration"

doctor: $(STAMP)
	$(BIN)/pudl doctor

clean:
	rm -rf $(VENV) runs .pytest_cache

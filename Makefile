# rankwise: the two commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CSRC   := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test demo bench bench-gpu clean

install: $(STAMP)

# With CUDA (nvidia-smi answers) keep or take a CUDA build of torch; without it,
# torch==2.13.0, the CPU build. The extension is built against that torch
# (--no-build-isolation), so no second torch is fetched.
$(STAMP): pyproject.toml setup.py requirements-dev.txt $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q "torch>=2.4"; \
	else \
	  $(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import rankwise, rankwise._C, rankwise.kernels; print('rankwise', rankwise.__version__, 'installed')"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/rankwise demo

bench: $(STAMP)
	$(PY) -m benchmarks.run --suite cpu

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.run --suite gpu

clean:
	rm -rf build *.egg-info src/*.egg-info src/rankwise/_C*.so

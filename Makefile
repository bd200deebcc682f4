# vlscale: `make demo` trains and evaluates the embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch that CI machines have on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: install lint format test test-fast demo demo-vlm vlm-inputs demo-paligemma clean

SHAPES := data/shapes

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed,eval]'
	# The eval bridges pull PyPI's torchvision (and timm, which imports it): built against the
	# CUDA torch, it fails to import beside the CPU build ("operator torchvision::nms does not
	# exist") and would break transformers' image processors. Nothing vlscale runs needs it.
	$(BIN)/pip uninstall -y -q torchvision timm
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Bytecode is cached even where the environment says not to (PYTHONDONTWRITEBYTECODE): the suite
# starts hundreds of processes, each of which would otherwise compile vlscale's modules again.
test: lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q --durations=25

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The embedded default: synthetic shapes shards (made once), the tiny SigLIP recipe, its results.
demo: install
	test -f $(SHAPES)/sizes.json || \
		$(BIN)/vlscale shards synthetic --out $(SHAPES) --train 20000 --val 512 --seed 0
	$(BIN)/vlscale train tiny_siglip
	$(BIN)/vlscale report runs/tiny_siglip

# The staged-VLM demo: an image tower taught each grid cell's shape and colour (tiny_cells, on
# shapes drawn at 96 px; trained first when absent) exported in Hugging Face layout, synthetic
# FineVision-format VQA shards at 96 px, stage 1 then stage 2, a few answers.
SHAPES96 := data/shapes96
VQA := data/vqa
COT := data/cot
PREF := data/pref
VQA_SUBSETS := shapes_colour,shapes_shape,shapes_count,shapes_position,shapes_caption,shapes_multiturn,shapes_text,shapes_two_images
# What both VLM demos start from (each step skipped when its output exists).
vlm-inputs: install
	test -f $(SHAPES96)/sizes.json || $(BIN)/vlscale shards synthetic --out $(SHAPES96) \
		--train 20000 --val 512 --seed 0 --image-size 96
	test -f runs/tiny_cells/eval.json || $(BIN)/vlscale train tiny_cells
	test -f runs/tiny_cells_export/vision/config.json || \
		$(BIN)/vlscale export runs/tiny_cells runs/tiny_cells_export
	test -f $(VQA)/shapes_colour/sizes.json || ( \
		$(BIN)/vlscale shards synthetic-vqa --out data/vqa_parquet --train 10000 --val 300 \
			--image-size 96 && \
		$(BIN)/vlscale shards finevision --source data/vqa_parquet --subsets $(VQA_SUBSETS) \
			--out $(VQA) --val-samples 300 --shard-size 500 )

demo-vlm: vlm-inputs
	$(BIN)/vlscale train tiny_vlm_stage1
	$(BIN)/vlscale train tiny_vlm_stage2
	$(BIN)/vlscale report runs/tiny_vlm_stage2
	$(BIN)/python -c "from core.data.synthetic import render, sample_attributes; import random; \
		render(sample_attributes(random.Random(7)), 96).save('runs/tiny_vlm_stage2/example.png')"
	$(BIN)/vlscale generate runs/tiny_vlm_stage2 --image runs/tiny_vlm_stage2/example.png \
		--prompt "What colour is the shape at the top right?" --prompt "How many shapes are there?" \
		--max-new-tokens 8
	# Stage 3: chain-of-thought SFT on synthetic rows in LLaVA-CoT-100k's layout; stage 4: DPO on
	# reasoned preference pairs in RLAIF-V's layout; each converted as the real dataset is.
	test -f $(COT)/sizes.json || ( \
		$(BIN)/vlscale shards synthetic-cot --out data/cot_src --rows 6000 --image-size 96 && \
		$(BIN)/vlscale shards llava-cot --source data/cot_src/train.jsonl --images data/cot_src \
			--out $(COT) --val-fraction 0.05 --shard-size 500 )
	$(BIN)/vlscale train tiny_vlm_stage3
	test -f $(PREF)/sizes.json || ( \
		$(BIN)/vlscale shards synthetic-preference --out data/pref_src --rows 6000 \
			--image-size 96 && \
		$(BIN)/vlscale shards rlaif-v --source data/pref_src --out $(PREF) --val-fraction 0.05 \
			--shard-size 500 )
	$(BIN)/vlscale train tiny_vlm_stage4
	$(BIN)/vlscale report runs/tiny_vlm_stage4
	$(BIN)/vlscale generate runs/tiny_vlm_stage4 --image runs/tiny_vlm_stage2/example.png \
		--prompt "What colour is the shape at the top right?" --max-new-tokens 96

# The PaliGemma demo: the same tower and shards, a tiny Gemma, prefix-LM; prompts are prefixes.
demo-paligemma: vlm-inputs
	test -f $(VQA)/paligemma_tokenizer/tokenizer_config.json || \
		$(BIN)/vlscale shards paligemma-tokenizer $(VQA)/tokenizer $(VQA)/paligemma_tokenizer
	$(BIN)/vlscale train tiny_paligemma
	$(BIN)/vlscale report runs/tiny_paligemma
	$(BIN)/python -c "from core.data.synthetic import render, sample_attributes; import random; \
		render(sample_attributes(random.Random(7)), 96).save('runs/tiny_paligemma/example.png')"
	$(BIN)/vlscale generate runs/tiny_paligemma --image runs/tiny_paligemma/example.png \
		--prompt "answer en What colour is the shape at the top right?" --prompt "caption en" \
		--max-new-tokens 12

clean:
	rm -rf runs .pytest_cache .ruff_cache

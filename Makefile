# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/mnist
CONFIG ?= configs/mnist_rpgan.yaml
RUN ?= runs/mnist_rpgan

.PHONY: demo test bench bench-gpu gpu-check clean-venv

# Every extra, at the exact versions the tests run with (constraints.txt; pyproject.toml states ranges).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Prepare the bundled MNIST, train the demo recipe (RpGAN + R1 + R2 on the half-width DCGAN; resumes if RUN
# exists), sample a grid, score every snapshot.
demo: $(STAMP)
	test -f $(DATA)/manifest.json || $(BIN)/ganpipe prepare --source mnist --out $(DATA) --holdout 1000
	$(BIN)/ganpipe verify $(DATA) --quiet
	$(BIN)/ganpipe train --config $(CONFIG) --run-dir $(RUN) data.path=$(DATA)
	$(BIN)/ganpipe sample --snapshot $$(ls $(RUN)/snapshots/snapshot-*.json | tail -1) --num 64 --out $(RUN)/demo-grid.png
	$(BIN)/ganpipe eval --run-dir $(RUN) --all --extractor mnist --num-gen 5000
	@echo "demo done: sample grid $(RUN)/demo-grid.png, scores $(RUN)/metrics.png, best snapshot $(RUN)/best.json"
	@cat $(RUN)/best.json

bench: $(STAMP)
	$(BIN)/ganpipe bench loader

# On a machine with a CUDA GPU: trainer vs plain loop for DCGAN-32, the SNGAN ResNet and StyleGAN2 at
# 256 px under fp32, bf16 and fp16, each trainer run once more under torch's sync debug mode "error",
# with nvidia-smi's utilisation sampled.
bench-gpu: $(STAMP)
	$(BIN)/ganpipe bench train --cases dcgan32 resnet32 stylegan2-256 --precision fp32 bf16 fp16 \
		--repeats 1 --kimg 4 --skip-multiprocess --sync-debug

# On a machine with a CUDA GPU, one bounded command: the device suite (tests/test_device.py on CUDA), then
# bench-gpu's cases and R3GAN at CIFAR-10 size under bf16, fp16 and fp32 and a few speed levers, within
# GPU_CHECK_BUDGET_S seconds; a JSON + Markdown report in the directory named on its last line (docs/gpu.md).
# Without a CUDA device it says so in one line and exits 2; GPU_CHECK_ARGS=--dry-run runs it on the CPU at toy size.
GPU_CHECK_BUDGET_S ?= 480
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py --budget-s $(GPU_CHECK_BUDGET_S) $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)

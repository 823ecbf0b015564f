# One command per task. `make test` and `make demo` set everything up from a fresh clone.
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MAX_JOBS ?= 2
RBD_CUDA ?= auto
# The CUDA kernels' emulated build for the tests (csrc/emu; setup.py).
RBD_EMU ?= 1
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
RESULTS ?= results
export MAX_JOBS TORCH_CUDA_ARCH_LIST RBD_CUDA RBD_EMU

.PHONY: venv install build test test-gpu reproduce table1-report table1-gpu demo bench bench-optim bench-quick gpu-check gpu-check-cpu emu-sanitize emu-mutants lint clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Builds the extension (CPU kernels always; CUDA kernels when nvcc is found, RBD_CUDA=auto|0|1),
# again only when a source, the build script or the build settings changed, or the library is gone.
BUILD_SETTINGS := RBD_CUDA=$(RBD_CUDA) RBD_EMU=$(RBD_EMU) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME)

$(VENV)/.build-settings: FORCE | $(BIN)/python
	@echo '$(BUILD_SETTINGS)' | cmp -s - $@ || echo '$(BUILD_SETTINGS)' > $@

$(VENV)/.installed: $(VENV)/.deps $(VENV)/.build-settings setup.py pyproject.toml $(shell find csrc -type f)
	set -o pipefail; $(BIN)/pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee build.log \
	  | { grep -E "^ *rbd_cuda:|\] .*(nvcc|c\+\+).*\.(cu|cpp)|error" || true; } \
	  | sed -E 's/ -.*(csrc\/[^ ]*\.(cu|cpp)).*/ ... \1/'
	touch $@

install: $(VENV)/.installed
	@ls rbd_cuda/_C*.so $(if $(filter 1,$(RBD_EMU)),rbd_cuda/_emu*.so) >/dev/null 2>&1 || { rm -f $< && $(MAKE) --no-print-directory install; }

FORCE:

build: venv
	$(BIN)/python setup.py build_ext --inplace

test: install
	$(BIN)/python -m pytest -q tests

# The emulated CUDA kernels under AddressSanitizer and ThreadSanitizer, small shapes (docs/building.md).
emu-sanitize: install
	$(BIN)/python tests/emu_check.py sanitize address
	$(BIN)/python tests/emu_check.py sanitize thread

# Planted kernel bugs, one at a time, against the emulated tests (tests/emu_mutants.md).
emu-mutants: install
	$(BIN)/python tests/emu_check.py mutants --out tests/emu_mutants.md

test-gpu: install
	$(BIN)/python -m pytest -q -m cuda tests

# The main job, about 10 minutes on a 2-core CPU: FC-MNIST for one epoch with SGD, RBD and FPD at the same d
# (RBD's re-drawn bases against one fixed basis), printed beside the committed long runs
# (docs/table1). More: rbd-reproduce -h
reproduce: install
	$(BIN)/rbd-reproduce --rows fc-mnist --methods sgd,rbd,fpd --epochs 1 --out $(RESULTS)/reproduce
	@printf '\n== For comparison, the committed long runs (docs/table1/table.md; epochs and augmentation per row) ==\n\n'
	@cat docs/table1/table.md

# The committed Table 1 runs as a table (docs/table1/table.md, table.json, curves.png), copied into
# docs/reproducing.md between its markers; trains nothing. Besides the paper's bases: other
# entries, and per-layer and per-tensor compartments at its total d.
table1-report: install
	$(BIN)/rbd-reproduce --report --rows fc-mnist,fc-fmnist,cnn-mnist,cnn-fmnist --methods sgd,rbd,fpd,nes --crop-pads 3,0,1,2 --seeds 0,1,2 \
	  --distributions normal,rademacher,uniform --compartments global,layer,tensor --total-dim 250 \
	  --out docs/table1 --no-progress
	$(BIN)/python -c "import re, pathlib; doc = pathlib.Path('docs/reproducing.md'); \
	  table = pathlib.Path('docs/table1/table.md').read_text(); \
	  text, n = re.subn(r'(?s)(<!-- docs/table1/table.md begins.*?-->\n).*?(<!-- docs/table1/table.md ends -->)', \
	  lambda m: m[1] + table + m[2], doc.read_text()); assert n == 1, 'docs/reproducing.md lost its table markers'; \
	  doc.write_text(text)"

# On a GPU machine (its own python3/torch): Table 1's FC rows, 4 methods x 3 seeds x 100 epochs.
table1-gpu:
	bash benchmarks/table1_gpu.sh $(RESULTS)/table1-gpu

demo: install
	$(BIN)/python -m examples.demo

# The microbenchmark suite (benchmarks/README.md): size grid, baselines, targets summary.
bench: install
	$(BIN)/python -m benchmarks.ops_bench --device cpu --preset cpu --out $(RESULTS)/ops_bench_cpu

bench-optim: install
	$(BIN)/python -m benchmarks.optim_compare --out $(RESULTS)/optim_compare

bench-quick: install
	$(BIN)/python -m benchmarks.ops_bench --device cpu --quick --out $(RESULTS)/ops_bench_quick

# On a GPU machine (uses that machine's python3/torch; builds for the local GPU): the CUDA tests,
# fused vs torch at D = 1e8, RBD vs SGD step times and launches, probe; at most 9 minutes
# (benchmarks/README.md).
gpu-check:
	bash benchmarks/gpu_check.sh $(RESULTS)/gpu-check

# Its rehearsal here, without a GPU: every stage that needs none, at tiny sizes (about a minute).
gpu-check-cpu: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --cpu $(RESULTS)/gpu-check-cpu

lint: venv
	$(BIN)/pip install -q ruff==0.17.6 && $(BIN)/ruff check rbd_cuda rbd_experiments tests benchmarks examples

clean:
	rm -rf build *.egg-info rbd_cuda/_C*.so build.log $(VENV)/.installed $(VENV)/.build-settings

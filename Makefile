# One-command set-up and the experiments. Everything runs inside $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision/torchaudio versions known to import together (laion_clap needs
# torchvision; audiobox-aesthetics declares torchaudio)
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
# the demo needs no backbone but melstats (numpy) and trains on the CPU: a CPU-only torch
# (pip takes 2.13.0 from this machine's disk) and the package without its extras
DEMO_TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 2

.PHONY: install install-demo test demo bench bench-gpu sweep-beta table1 table2 table-losses \
	table-beyond faults clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PKGS)
	$(BIN)/python -m pip install -q -e ".[backbones,dev]"
	touch $(STAMP)

# what `make demo` needs, and no more; after `make install` it adds nothing
install-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -f $(STAMP) || $(BIN)/python -m pip install -q $(DEMO_TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $(DEMO_STAMP)

# ruff first (seconds), then the suite on every core (pytest-xdist): one torch thread per
# worker, as the workers share the cores; PYTEST_OPTS=... adds options (e.g. --durations=50)
test: $(STAMP)
	$(BIN)/ruff check --no-cache .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist worksteal $(PYTEST_OPTS)

demo: $(DEMO_STAMP)
	$(BIN)/python -m qamro_pipe demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# on a machine with a GPU and the packages already present (see docs/benchmarks.md)
bench-gpu:
	bash benchmarks/gpu.sh

# OUT=FOLDER writes the run there instead of cache/runs/NAME; FORCE=1 replaces a run folder
# qamro-pipe wrote there (a rerun of the same target), keeping one you added files to
RUN_OPTS = $(if $(OUT),--out $(OUT)) $(if $(FORCE),--force)

sweep-beta: $(STAMP)
	$(BIN)/qamro-pipe sweep --recipe musiceval --grid beta $(RUN_OPTS)

# make table1 PRESET=paper|code (the table's model recipe for that preset; without PRESET
# the table's own, as the README says), CACHE=FILE to train on another cache
TABLE_OPTS = $(if $(PRESET),--preset $(PRESET)) $(if $(CACHE),--cache $(CACHE)) $(RUN_OPTS)

table1: $(STAMP)
	$(BIN)/qamro-pipe table --recipe table1 $(TABLE_OPTS)

table2: $(STAMP)
	$(BIN)/qamro-pipe table --recipe table2 $(TABLE_OPTS)

# every loss on one cache, N seeds, each compared with QAMRO (docs/losses.md); PRESET and
# CACHE as above, or MODEL=demo (the demo cache, after make demo)
table-losses: $(STAMP)
	$(BIN)/qamro-pipe table --recipe table-losses $(TABLE_OPTS) $(if $(MODEL),--model $(MODEL))

# structured batches, the system-level term, learned weights, preference pairs against QAMRO
# (docs/beyond.md); PRESET, CACHE and MODEL as for table-losses; PAIRS=FILE a pairs file
# (MODEL=demo: the demo corpus's own, written by `make demo`)
table-beyond: $(STAMP)
	$(BIN)/qamro-pipe table --recipe table-beyond $(TABLE_OPTS) $(if $(MODEL),--model $(MODEL)) \
		$(if $(PAIRS),--pairs $(PAIRS),$(if $(filter demo,$(MODEL)),--pairs $${QAMRO_CACHE_DIR:-cache}/demo-corpus/pairs.jsonl))

clean:
	rm -rf $(VENV) build *.egg-info

faults: $(STAMP)
	$(BIN)/python tests/faults/report.py

# `make train` and `make test` work on a fresh machine: they create .venv and install the package
# (pinned by constraints.txt) when missing or when setup.py / constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where `make train` writes its run (resumed if it exists).
TRAIN_DIR ?= runs/recall_tiny
# pytest-xdist workers; each emulates 8 CPU devices.
TEST_WORKERS ?= auto
PYTEST_ARGS ?=

.PHONY: install test train eval constraints clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@echo "== creating $(VENV) and installing efficientlm with its pinned dependencies (constraints.txt);"
	@echo "== the first time, about 90 packages (3.3 GB installed: JAX, TensorFlow for the input pipelines), minutes"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e '.[data,test]'
	touch $@
	@echo "== installed into $(VENV)"

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -q tests $(PYTEST_ARGS)

train: install
	$(BIN)/python -m efficientlm.main --gin_file=runs/recall_tiny.gin --gin.MODEL_DIR="'$(TRAIN_DIR)'"

# Scores the newest checkpoint of `make train`'s run as its own evaluation does (same settings).
eval: install
	$(BIN)/python -m efficientlm.main --run_mode=eval --gin_file=runs/recall_tiny.gin \
	  --gin.MODEL_DIR="'$(TRAIN_DIR)'"

# Re-pin after a deliberate upgrade: everything installed in .venv except efficientlm itself.
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

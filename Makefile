# Two commands a newcomer needs: `make run` (set up + the main job) and `make test` (set up + the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/openk2 pretrain

test: setup
	$(BIN)/python -m pytest tests -x -q --durations=15

clean:
	rm -rf $(VENV) runs

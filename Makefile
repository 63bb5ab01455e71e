# Two commands for a fresh Linux machine: `make run` starts the proxy, `make test` runs every test.
# Both create the virtualenv they need. CI runs `.ci/run`, which installs system packages and then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/activate: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(BIN)/activate

run: $(BIN)/activate
	$(BIN)/python -m proxy_app serve

test: $(BIN)/activate
	$(BIN)/ruff check proxy_app tests wsgi.py deploy bench
	$(BIN)/pytest -p no:cacheprovider

lint: $(BIN)/activate
	$(BIN)/ruff check proxy_app tests wsgi.py deploy bench
	$(BIN)/ruff format --check proxy_app tests wsgi.py deploy bench

bench: $(BIN)/activate
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache

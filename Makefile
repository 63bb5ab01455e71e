# Two commands for a fresh Linux machine: `make run` starts the proxy, `make test` runs every test.
# Both create the virtualenv they need. CI runs `.ci/run`, which installs system packages and then `make test`.
# `make test-fast` runs the unit tier only, on two pytest processes (18 to 35 s on a 2-core machine, by its speed
# and load): while working, before `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint bench clean

# The unit tier: test files whose tests run inside pytest's own processes, with no child process (no gunicorn, no
# `serve`, no nginx, Prometheus or Chromium); the in-process fake Ollama and the local PostgreSQL count as cheap.
# A file joins this list only while that holds for every test in it; `make test` runs these and all the others.
UNIT_TESTS := tests/test_usage.py tests/test_intake.py tests/test_framing.py tests/test_config.py \
	tests/test_csvlog.py tests/test_queries.py tests/test_dashboard.py tests/test_security.py tests/test_upstream.py \
	tests/test_writer.py tests/test_bad_input.py tests/test_dispatch.py tests/test_front_loop.py tests/test_inflight.py \
	tests/test_heap.py \
	tests/test_package.py::test_package_ranges_hold_the_pins

$(BIN)/activate: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(BIN)/activate

run: $(BIN)/activate
	$(BIN)/python -m proxy_app serve

test: $(BIN)/activate
	$(BIN)/ruff check proxy_app tests wsgi.py deploy bench
	$(BIN)/lint-imports
	$(BIN)/pytest -p no:cacheprovider

test-fast: $(BIN)/activate
	$(BIN)/pytest -p no:cacheprovider -n 2 $(UNIT_TESTS)

lint: $(BIN)/activate
	$(BIN)/ruff check proxy_app tests wsgi.py deploy bench
	$(BIN)/ruff format --check proxy_app tests wsgi.py deploy bench

bench: $(BIN)/activate
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache

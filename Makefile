# visiontune: `make run` runs the pipeline on the embedded defaults, `make test` runs the tests.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
# pip's index configuration on some machines warns about every missing local index entry
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install run test bench-check test-floors lint docs docs-serve mlflow-ui mlflow-server mlflow-team-server prefect-server prefect-worker clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install --quiet -e ".[test]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import visiontune.components, visiontune.pipelines, torch, timm, mlflow, prefect"
	touch $(STAMP)

install: $(STAMP)

run: install
	dvc repro
	visiontune summary

# two pytest-xdist workers, each taking whole files (a file's module fixtures are built once)
TEST_WORKERS ?= 2
test: install
	python -m pytest -n $(TEST_WORKERS) --dist loadfile

# the headline CPU figures rerun and compared with bench/results/check.json (about 8 minutes)
bench-check: install
	python bench/check.py

# the unit tests in a venv of their own (.venv-floors) with every dependency at its floor
test-floors:
	bash .ci/floors.sh

lint: install
	ruff check components pipelines tests bench
	ruff format --check components pipelines tests bench

# the docs site (MkDocs, Material): sources in docs/, built into the git-ignored site/
DOCS_STAMP := $(VENV)/.docs-stamp
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[docs]" 2>&1 | $(QUIET_PIP)
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 mkdocs serve --dev-addr 127.0.0.1:8001

mlflow-ui: install
	mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts \
		--host 127.0.0.1 --port 5000

mlflow-server: install
	bash infra/mlflow-server.sh

mlflow-team-server: install
	bash infra/mlflow-team-server.sh

prefect-server: install
	bash infra/prefect-server.sh

prefect-worker: install
	bash infra/prefect-worker.sh

clean:
	rm -rf data/prepared

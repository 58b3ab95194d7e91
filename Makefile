# RisKVA: the two commands that must always work on a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RISKVA_HOME ?= $(CURDIR)/riskva_home
export DAGSTER_HOME ?= $(RISKVA_HOME)/dagster_home
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DAGSTER_DISABLE_TELEMETRY ?= true
# DeepSpeed picks its accelerator at import; on a machine without a usable NVIDIA GPU it must be
# told "cpu". With a GPU the variable is left unset (an exported empty value makes DeepSpeed refuse
# to start, as does one inherited empty); a non-empty value set by the caller is kept either way.
ifeq ($(strip $(DS_ACCELERATOR)),)
  ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
    unexport DS_ACCELERATOR
  else
    export DS_ACCELERATOR := cpu
  endif
endif
PORT ?= 3000
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
LABELSTUDIO_PORT ?= 8089

.PHONY: install test demo ui mlflow-ui serve smoke bench browser postgres netns labelstudio labelstudio-install clean print-env gpu-check

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch and torchvision are
# installed first, pinned together, so no resolver can pull in a different torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# $(call missing,WHAT,TESTS): a system package `make test` could not install. Under CI=true this stops
# make, since CI must run those tests (they fail there instead of skipping); elsewhere they skip.
missing = if [ "$$CI" = true ]; then echo "make: $(1) is missing and could not be installed; under CI=true $(2) must run, stopping" >&2; exit 1; \
	  else echo "make: $(1) is missing; $(2) will be skipped"; fi

# Chromium for the Dagster UI browser tests (Debian's package; never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null; } \
	    || { $(call missing,chromium,the browser tests); }; \
	  else echo "browser tests need Chromium: sudo apt-get install -y chromium fonts-wqy-zenhei"; \
	    $(call missing,chromium,the browser tests); fi; }

# PostgreSQL for the scale-out storage test (Debian's package; the test starts its own cluster in a
# temporary folder on a free port and stops it; nothing is started here).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	    || { $(call missing,postgresql,the Postgres test); }; \
	  else echo "the Postgres test needs PostgreSQL: sudo apt-get install -y postgresql"; \
	    $(call missing,postgresql,the Postgres test); fi; }

# iproute2 for the two-node Ray test (it builds its own network namespaces; nothing is started here).
netns:
	@command -v ip >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null; } \
	    || { $(call missing,iproute2,the two-node Ray test); }; \
	  else echo "the Ray test needs iproute2 and root: sudo apt-get install -y iproute2"; \
	    $(call missing,iproute2,the two-node Ray test); fi; }

# Label Studio, the review desk (issue 28), in its own cached venv (~/.cache/riskva/labelstudio; its pins
# clash with the project's): `make labelstudio` installs it once and runs it on 127.0.0.1 in the foreground,
# SQLite under $(RISKVA_HOME)/labelstudio (Postgres: DJANGO_DB=default + POSTGRE_*). Credentials come from
# LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN, or are generated into $(RISKVA_HOME)/labelstudio/credentials.env.
labelstudio-install:
	@python3 scripts/labelstudio.py install || { $(call missing,label-studio,the closing-the-loop test); }

labelstudio:
	python3 scripts/labelstudio.py start --port $(LABELSTUDIO_PORT) --data-dir $(RISKVA_HOME)/labelstudio \
	  --document-root $(RISKVA_HOME)

# One pytest-xdist worker per core (at most 4: a real-width module peaks near 8 GB), each taking a
# whole module at a time (module fixtures are built once), longest modules first (tests/conftest.py).
# `.venv/bin/pytest tests/x.py` alone runs in one process as usual.
PYTEST_WORKERS ?= auto
test: install browser postgres netns labelstudio-install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder

demo: install
	$(PY) -m riskva_assets.demo

ui: install
	@$(PY) -m riskva_assets.instance >/dev/null
	@echo "Dagster UI: http://127.0.0.1:$(PORT)  (DAGSTER_HOME=$(DAGSTER_HOME))"
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

mlflow-ui: install
	@mkdir -p $(RISKVA_HOME)/mlflow/artifacts
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(RISKVA_HOME)/mlflow/mlflow.db \
	  --default-artifact-root $(RISKVA_HOME)/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

serve: install
	$(VENV)/bin/riskva serve --port $(SERVE_PORT)

smoke: install
	$(VENV)/bin/pytest tests/test_readme.py

bench: install
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_infer.py

clean:
	rm -rf $(RISKVA_HOME) test-artifacts .pytest_cache

# What the recipes' environment looks like (tests/test_makefile.py checks DS_ACCELERATOR on fake GPU hosts).
print-env:
	@echo "DS_ACCELERATOR=$${DS_ACCELERATOR-<unset>}"

# On a lent GPU host: the 7B path end to end at full size, one JSON of figures (benchmarks/RESULTS.md).
gpu-check: install
	bash benchmarks/gpu_check.sh

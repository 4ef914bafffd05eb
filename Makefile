# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
UI_PORT ?= 3070

INSTANCE_CONFIG := $(DAGSTER_HOME)/dagster.yaml

.PHONY: run test browser ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job: the whole asset graph on $MELOFORMER_CORPUS_DIR (default: the sample corpus).
run: $(STAMP) $(INSTANCE_CONFIG)
	$(BIN)/python -m pipelines.run

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The instance's settings (telemetry off, run and pool limits) from pipelines/dagster.yaml
$(INSTANCE_CONFIG): pipelines/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp pipelines/dagster.yaml $@

# Chromium for the UI test's screenshot (tests/test_ui.py): installed with apt-get when missing
# and we are root; otherwise that test skips (and fails where CI is set).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "chromium not installed: the UI screenshot test will skip (fail where CI is set)"

# The Dagster UI on http://127.0.0.1:$(UI_PORT)
ui: $(STAMP) $(INSTANCE_CONFIG)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	for name in preprocess pipeline packing attention train generate; do \
		$(BIN)/python benchmarks/$$name.py || exit 1; \
	done

clean:
	rm -rf build .pytest_cache

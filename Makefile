# Every target creates the virtualenv it needs; a fresh machine needs only
# Python >= 3.11 with venv, pip and gcc.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two install levels in one virtualenv: running needs the runtime
# dependencies only; tests, lint and benchmarks add the dev and bench extras.
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto')
PYTEST_ARGS ?=
# What `buf breaking` checks the protos against: any buf input, e.g.
# make lint BUF_AGAINST='.git#branch=main'. Empty: the previous commit, which
# needs git history (CI's full clone has it; a shallow clone does not).
BUF_AGAINST ?=

.PHONY: venv run test test-fast test-slow node-deps lint buf-lint fmt protos protos-check bench k8s-check k8s-rules docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(STAMP) $(RUN_STAMP)

venv: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/statecar up

test: $(STAMP) lint protos-check node-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# The suite in two halves, for a quicker loop while working: everything but
# the slow fault/load tests, and those alone (`make test` and CI run both).
test-fast: $(STAMP) node-deps
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) node-deps
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# The Node.js client test's packages (tests/node): installed when npm exists;
# without it that test skips (outside CI) and says why.
NODE_STAMP := tests/node/node_modules/.installed
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(NODE_STAMP)

node-deps:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: tests/test_node_client.py will skip"; fi

lint: $(STAMP) buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# buf lint (STANDARD + COMMENTS), then buf breaking (FILE) against BUF_AGAINST
# or the previous commit. Without that commit it stops with an error in CI
# (CI=true), where a missing check would pass a breaking change silently, and
# says it skipped the check elsewhere; a repository's first commit has nothing
# to compare with.
buf-lint: $(STAMP)
	$(BIN)/buf lint
	@against='$(BUF_AGAINST)'; \
	if [ -z "$$against" ]; then \
	  if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null 2>&1; then \
	    against='.git#ref=HEAD~1'; \
	  elif git rev-parse -q --verify 'HEAD^{commit}' >/dev/null 2>&1 \
	      && [ "$$(git rev-parse --is-shallow-repository)" = false ]; then \
	    echo "buf breaking: skipped, HEAD is the first commit (nothing to compare with)"; \
	    exit 0; \
	  elif [ "$${CI:-}" = true ]; then \
	    echo "buf breaking: the previous commit is not here (shallow clone or no git);" \
	      "clone with history (git fetch --deepen=1) or set BUF_AGAINST" >&2; \
	    exit 1; \
	  else \
	    echo "buf breaking: SKIPPED, the previous commit is not here (shallow clone or no" \
	      "git); run git fetch --deepen=1 or set BUF_AGAINST"; \
	    exit 0; \
	  fi; \
	fi; \
	echo "$(BIN)/buf breaking --against '$$against' --against-config buf.yaml"; \
	$(BIN)/buf breaking --against "$$against" --against-config buf.yaml || { \
	  echo "buf breaking: the protos break compatibility with $$against (see above)." \
	    "Make the change compatible, or, for an intended break of an API still" \
	    "allowed to change, land it with at least one commit after it" \
	    "(the check compares the last commit only)" >&2; exit 1; }

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: $(STAMP)
	$(BIN)/python protos/generate.py

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check

# The k8s/ manifests and the Dockerfile, checked offline (needs kubectl).
k8s-check: $(STAMP)
	$(BIN)/pytest tests/test_k8s.py

# Regenerates k8s/components/monitoring/prometheus-rules.yaml from monitoring/rules/.
k8s-rules: $(STAMP)
	$(BIN)/python -m tools.prometheus_rules

# Regenerates docs/configuration.md from the settings classes.
docs: $(STAMP)
	$(BIN)/python -m tools.settings_docs

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

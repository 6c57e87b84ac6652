# Every target creates the virtualenv it needs; a fresh machine needs only
# Python >= 3.11 with venv, pip and gcc.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto')
PYTEST_ARGS ?=
# What `buf breaking` checks the protos against: any buf input, e.g.
# make lint BUF_AGAINST='.git#branch=main'. Empty: the previous commit, which
# needs git history (CI's full clone has it; a shallow clone does not).
BUF_AGAINST ?=

.PHONY: venv run test lint buf-lint fmt protos protos-check bench k8s-check k8s-rules clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/statecar up

test: $(STAMP) lint protos-check
	$(BIN)/pytest $(PYTEST_ARGS)

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

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

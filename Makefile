# Everyday entry points. The logic lives in platform/bootstrap.sh (the virtualenv) and
# platform/services.py (Kafka and PostgreSQL); this file only strings them together.
SHELL := bash
PYTHON3 ?= python3
SERVICES := $(PYTHON3) platform/services.py
# Written by bootstrap.sh: the venv lives in the cache, keyed by pyproject.toml.
VENV = "$$(cat .evp/venv-path)"
# The variables that point evp's clients at the local services (credential files, never values).
CLIENT_ENV = eval "$$($(SERVICES) env)";

.PHONY: venv services services-down status demo test typecheck bench soak poison lock clean-state

venv:
	@bash platform/bootstrap.sh >/dev/null

services:
	@$(SERVICES) up

services-down:
	@$(SERVICES) down

status:
	@$(SERVICES) status

# Both example projects end to end, one after the other; `make demo EXAMPLE=clinic` runs one.
EXAMPLES := digits clinic
EXAMPLE ?= $(EXAMPLES)
demo: venv services
	@$(CLIENT_ENV) for example in $(EXAMPLE); do \
	  if [ ! -f examples/$$example/demo.py ]; then echo "make demo: no example '$$example' (have: $(EXAMPLES))" >&2; exit 2; fi; \
	  echo "== example $$example"; $(VENV)/bin/python examples/$$example/demo.py || exit 1; \
	done

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: venv services typecheck
	@$(CLIENT_ENV) $(VENV)/bin/python -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# mypy --strict over the packages (settings in pyproject.toml).
typecheck: venv
	@$(VENV)/bin/python -m mypy

# Every bench/bench_*.py is a script that prints its ratios against its own baseline.
bench: venv services
	@shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "make bench: no bench/bench_*.py scripts" >&2; exit 1; fi; \
	$(CLIENT_ENV) for script in "$${scripts[@]}"; do echo "== $$script"; $(VENV)/bin/python "$$script" || exit 1; done

# The fault soak: SOAK_ARGS as python -m tests.soak.soak takes them (default 200 trials of every kind).
SOAK_ARGS ?= --trials 200
soak: venv services
	@$(CLIENT_ENV) $(VENV)/bin/python -m tests.soak.soak $(SOAK_ARGS)

# The poison fuzz: POISON_ARGS as bench/poison.py takes them (default 10,000 mutated records; --seed S replays one).
POISON_ARGS ?= --records 10000
poison: venv services
	@$(CLIENT_ENV) $(VENV)/bin/python bench/poison.py $(POISON_ARGS)

# Re-pin every dependency, with hashes, from pyproject.toml (uv comes from PyPI into the cache).
lock:
	@tools="$${XDG_CACHE_HOME:-$$HOME/.cache}/evp/lock-tools"; \
	[ -x "$$tools/bin/uv" ] || { $(PYTHON3) -m venv "$$tools" && "$$tools/bin/pip" install -q uv; }; \
	"$$tools/bin/uv" pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o platform/requirements.lock

# Stops the services and deletes the state directory (broker log, database, snapshots,
# keys). The jar and venv caches stay.
clean-state:
	@$(SERVICES) clean

# Everyday entry points. The logic lives in platform/bootstrap.sh (the virtualenv) and
# platform/services.py (Kafka and PostgreSQL); this file only strings them together.
SHELL := bash
PYTHON3 ?= python3
SERVICES := $(PYTHON3) platform/services.py
# Written by bootstrap.sh: the venv lives in the cache, keyed by pyproject.toml.
VENV = "$$(cat .evp/venv-path)"

.PHONY: venv services services-down status demo test bench clean-state

venv:
	@bash platform/bootstrap.sh >/dev/null

services:
	@$(SERVICES) up

services-down:
	@$(SERVICES) down

status:
	@$(SERVICES) status

demo: venv services
	$(VENV)/bin/evp demo

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: venv services
	@$(VENV)/bin/python -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Every bench/bench_*.py is a script that prints its ratios against its own baseline.
bench: venv services
	@shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "make bench: no bench/bench_*.py scripts" >&2; exit 1; fi; \
	for script in "$${scripts[@]}"; do echo "== $$script"; $(VENV)/bin/python "$$script" || exit 1; done

# Stops the services and deletes the state directory (broker log, database, snapshots,
# keys). The jar and venv caches stay.
clean-state:
	@$(SERVICES) clean

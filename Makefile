.PHONY: setup setup-test run test lint schemas clean

# What `sieve demo` needs, and nothing else: the first command stays fast on a fresh machine.
setup:
	bash scripts/setup.sh

# That, plus what only the tests, linters and benchmarks use (dev extras, Chromium, helm, the Milvus server).
setup-test:
	bash scripts/setup.sh --test

run: setup
	.venv/bin/sieve demo

test: setup-test
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

lint: setup-test
	.venv/bin/ruff check services tests bench
	.venv/bin/mypy services bench

schemas:
	.venv/bin/sieve schemas

clean:
	rm -rf var

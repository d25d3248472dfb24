.PHONY: setup setup-test run test test-all lint schemas clean

# What `sieve demo` needs, and nothing else: the first command stays fast on a fresh machine.
setup:
	bash scripts/setup.sh

# That, plus what only the tests, linters and benchmarks use (dev extras, Chromium, helm, the Milvus server).
setup-test:
	bash scripts/setup.sh --test

run: setup
	.venv/bin/sieve demo

# The index, moderator and fault tests run a second time on the Milvus index backend (the whole suite runs
# with either: SIEVE_INDEX_BACKEND=milvus make test-all).
MILVUS_TESTS = tests/integration/test_infer_ahead.py tests/integration/test_promotion.py \
	tests/e2e/test_moderator_stream.py tests/e2e/test_faults.py tests/e2e/test_fast_paths.py

test: setup-test
	.venv/bin/python -m pytest -q -p no:cacheprovider tests
	SIEVE_INDEX_BACKEND=milvus .venv/bin/python -m pytest -q -p no:cacheprovider $(MILVUS_TESTS)

test-all: setup-test
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

lint: setup-test
	.venv/bin/ruff check services tests bench
	.venv/bin/mypy services bench

schemas:
	.venv/bin/sieve schemas

clean:
	rm -rf var

.PHONY: setup run test lint schemas clean

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/sieve demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider tests

lint:
	.venv/bin/ruff check services tests bench
	.venv/bin/mypy services bench

schemas:
	.venv/bin/sieve schemas

clean:
	rm -rf var

# The two commands the README promises: each creates/updates .venv itself.
.PHONY: setup test demo lint bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -p no:cacheprovider

demo: setup
	.venv/bin/python -m jobs.local

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python benchmarks/bench_prepare.py

# The two commands the README promises: each creates/updates .venv itself.
.PHONY: setup test demo lint bench

setup:
	bash scripts/setup.sh

# ruff, the main suite in .venv, then the torch_xla suite in .venv-xla (built while the main suite runs).
test: setup
	bash scripts/test.sh

demo: setup
	.venv/bin/python -m jobs.local

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python benchmarks/bench_prepare.py
	.venv/bin/python benchmarks/bench_teacher.py
	.venv/bin/python benchmarks/bench_train.py

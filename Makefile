# The two commands the README promises: each creates/updates .venv itself.
.PHONY: setup test demo lint bench

setup:
	bash scripts/setup.sh

# The main suite in .venv, then the torch_xla suite in .venv-xla (scripts/test_xla.sh creates it).
test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15
	bash scripts/test_xla.sh

demo: setup
	.venv/bin/python -m jobs.local

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python benchmarks/bench_prepare.py
	.venv/bin/python benchmarks/bench_teacher.py
	.venv/bin/python benchmarks/bench_train.py

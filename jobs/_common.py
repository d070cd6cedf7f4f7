"""What every `python -m jobs.X` shares: config flags, logging, connecting to Ray, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from pipeline import PipelineError
from pipeline.config import Config, load_config, presets


def parser(description: str, *, dataset_output: bool = False) -> argparse.ArgumentParser:
    """Flags every job takes; `dataset_output` adds --output/--overwrite for jobs writing a dataset."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None,
                   help=f"preset ({', '.join(presets())}) or YAML file; defaults to built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. prepare.rows_per_file=500")
    if dataset_output:
        p.add_argument("--output", required=True, help="output dataset dir, local or gs://")
        p.add_argument("--overwrite", action="store_true",
                       help="delete an existing output made from another plan first")
    return p


def report(output: str, manifest: dict) -> int:
    """Print a finished dataset's counts as JSON (the job's result line for `ray job logs`)."""
    print(json.dumps({"output": output, **manifest["counts"]}, indent=2))
    return 0


def config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def init_ray() -> None:
    """Join the cluster a `ray job submit` runs us on (RAY_ADDRESS), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def main(body: Callable[[], int | None]) -> None:
    """Run a job body: expected errors print one clear line and exit 1; nothing else is hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(body() or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

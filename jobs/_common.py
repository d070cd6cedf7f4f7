"""What every `python -m jobs.X` shares: config flags, logging, connecting to Ray, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipeline import PipelineError
from pipeline.config import Config, load_config, presets


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None,
                   help=f"preset ({', '.join(presets())}) or YAML file; defaults to built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. prepare.rows_per_file=500")
    return p


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

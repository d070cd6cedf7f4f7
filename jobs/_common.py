"""What every `python -m jobs.X` shares: one parser (config flags), logging, connecting to Ray, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pipeline import PipelineError
from pipeline.config import Config, load_config, presets


def parser(description: str, *, dataset_output: bool = False, config: bool = True,
           aliases: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser every job uses: `--config PRESET|FILE.yaml` and `section.key=value` overrides (added by `parse`);
    `dataset_output` adds --output/--overwrite for jobs writing a dataset. `aliases` maps a flag to the
    config key it sets (`{"--device": "eval.device"}`): the same key under a shorter name, typed and with
    the key's choices, applied after the overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("--config", default=None,
                       help=f"preset ({', '.join(presets())}) or YAML file; defaults to built-in defaults")
    for flag, key in (aliases or {}).items():
        p.add_argument(flag, dest=_dest(key), default=None, **_flag_kind(key))
    p.set_defaults(_aliases=dict(aliases or {}))
    if dataset_output:
        p.add_argument("--output", required=True, help="output dataset dir, local or gs://")
        p.add_argument("--overwrite", action="store_true",
                       help="delete an existing output made from another plan first")
    return p


def _dest(key: str) -> str:
    return "alias__" + key.replace(".", "__")


def _field(key: str) -> tuple[Any, Any]:
    """(type, default) of a dotted config key, e.g. eval.device."""
    cls, value = Config, Config()
    *sections, leaf = key.split(".")
    for part in sections:
        cls, value = typing.get_type_hints(cls)[part], getattr(value, part)
    return typing.get_type_hints(cls)[leaf], getattr(value, leaf)


def _flag_kind(key: str) -> dict[str, Any]:
    tp, default = _field(key)
    shown = f"same as {key}=VALUE (default {default!r}: the config's)"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
    if base is bool:
        return {"action": "store_const", "const": True, "help": f"same as {key}=true"}
    if typing.get_origin(base) is typing.Literal:
        return {"choices": typing.get_args(base), "help": shown}
    return {"type": base if base in (int, float) else str, "help": shown}


def config(args: argparse.Namespace) -> Config:
    """The job's Config: the preset or file, the KEY=VALUE overrides, then the alias flags given."""
    values = {key: getattr(args, _dest(key)) for key in args._aliases.values() if getattr(args, _dest(key)) is not None}
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []), values)


def parse(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, Config]:
    """Arguments and Config. The overrides are declared here, after the job's own positional (a run directory), so
    that they follow it, and flags may come between: `curve RUN --mels M eval.max_questions=8 --output O`."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. prepare.rows_per_file=500")
    args = p.parse_intermixed_args()
    return args, config(args)


def report(output: str, manifest: dict) -> int:
    """Print a finished dataset's counts as JSON (the job's result line for `ray job logs`)."""
    print(json.dumps({"output": output, **manifest["counts"]}, indent=2))
    return 0


def print_json(obj: Any) -> int:
    print(json.dumps(obj, indent=2, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))
    return 0


def check_inputs(*datasets: tuple[str, str]) -> None:
    """Each (url, kind) is a finished dataset of that kind whose manifest and file sizes are intact
    (cache.check_manifest), checked before Ray starts: an unfinished run, a wrong directory or a truncated copy
    fails in a second, not after Ray's start-up. The stage checks again where it reads."""
    from pipeline import cache

    for url, kind in datasets:
        cache.check_manifest(url, kind=kind)


def init_ray() -> None:
    """Join the Ray that RAY_ADDRESS names (`ray job submit` and KubeRay set it; a user may, after `ray start`), else
    start one of this job's own that ends with it. Never Ray's "find a running local instance": on a machine running
    several, it picks by a file that any `ray start` rewrites (README "Jobs side by side")."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        start_local(log_to_driver=True)


def start_local(**kwargs: Any) -> None:
    """Start a local Ray whose processes all have its address in RAY_ADDRESS. Without it Ray's State API, which Ray
    Train's placement-group cleaner polls every second, takes the machine's one gcs_server process, and fails once a
    second instance runs ("Found multiple active Ray instances"). Workers inherit the raylet's environment, fixed
    when ray.init starts it, so the GCS port is chosen first. The dashboard serves that API, so it must run."""
    import ray

    if kwargs.get("include_dashboard") is False:  # Ray would still record its default port (8265) as the API's
        raise ValueError("start_local needs the dashboard: without it, the State API's address is a port that "
                         "nothing serves (warnings every second) or another instance's dashboard does")
    with socket.socket() as s:  # a free port, bound by the GCS a moment later
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port))
    try:
        ray.init(address="local", **kwargs)  # "local": always a new instance, whatever RAY_ADDRESS says
    except BaseException:
        os.environ.pop("RAY_ADDRESS")
        raise
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT")
    started = ray.get_runtime_context().gcs_address
    if started != address:
        raise RuntimeError(f"Ray started at {started}, not at {address}: its processes would look for another")


def expected_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError behind `exc`: itself, or one raised inside a Ray task or actor (a corrupt file met by a
    Ray Data read), which reaches the driver wrapped in Ray's errors; None for anything else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PipelineError) and type(exc).__module__.startswith("pipeline"):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def main(body: Callable[[], int | None]) -> None:
    """Run a job body: expected errors print one clear line and exit 1; nothing else is hidden."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(body() or 0)
    except Exception as e:
        expected = expected_error(e)
        if expected is None:
            raise
        message = str(expected)
        if expected is not e:  # from a Ray task: Ray re-raises it with its retry notes on lines of their own
            message = (message.splitlines() or [type(expected).__name__])[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

"""infra/: the `ray up` configs pass Ray's own schema, the KubeRay manifests name what their accelerators
need, the images they run are built here, and every entrypoint is a real job with arguments it accepts.

Each check is a function that returns the problems it finds, so that the tests below can show it on the
files as they are (no problems) and on damaged copies (the problem named).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray._private.accelerators import TPUAcceleratorManager, tpu
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util.tpu import get_tpu_worker_resources

from jobs import _common
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SERVE_CONFIGS = sorted((INFRA / "ray").glob("serve*.yaml"))  # Ray Serve configs, not `ray up` ones
RAY_CONFIGS = [p for p in sorted((INFRA / "ray").glob("*.yaml")) if p not in SERVE_CONFIGS]
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))
README = INFRA / "README.md"

# TPU VM software version for each generation (Cloud TPU's "TPU software versions" page).
TPU_RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
# GKE's cloud.google.com/gke-tpu-accelerator values and the generation each names.
GKE_TPU = {"tpu-v4-podslice": "v4", "tpu-v5-lite-podslice": "v5litepod", "tpu-v5p-slice": "v5p",
           "tpu-v6e-slice": "v6e"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
# Left out of a config, these take Ray's defaults: a nightly Ray wheel and a dashboard on 0.0.0.0.
EXPLICIT_KEYS = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands", "file_mounts", "available_node_types", "head_node_type")

# KubeRay v1 fields (ray-operator/apis/ray/v1): anything else is a typo the CRD would drop or refuse.
CLUSTER_SPEC_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                     "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                     "managedBy", "upgradeStrategy", "authOptions"}
HEAD_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
               "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels"}
JOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                 "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                 "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                 "entrypointNumGpus", "entrypointMemory", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes",
                 "suspend", "schedule"}


# --- what the project pins ------------------------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_requirement() -> Requirement:
    return next(r for r in map(Requirement, pyproject()["project"]["dependencies"]) if r.name == "ray")


def tpu_pins() -> dict[str, str]:
    """The `tpu` extra's exact pins: torch_xla and the torch it needs."""
    pins = {}
    for req in map(Requirement, pyproject()["project"]["optional-dependencies"]["tpu"]):
        (spec,) = req.specifier
        pins[req.name] = spec.version
    return pins


def setup_torch() -> str:
    """The torch version scripts/setup.sh installs (the one the test suite runs)."""
    return re.search(r"TORCH_SPEC:-torch==([\w.]+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)


def package_dirs() -> list[str]:
    return [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]


def cluster_ray_pin() -> str:
    """The Ray every node runs: one pin across all `ray up` configs."""
    pins = {p for path in RAY_CONFIGS for p in re.findall(r"ray\[default\]==([\w.]+)", path.read_text())}
    assert len(pins) == 1, f"the ray up configs pin different Rays: {pins}"
    return pins.pop()


# --- `ray up` configs ------------------------------------------------------------------------------------


def node_kind(node_type: dict[str, Any]) -> str:
    cfg = node_type.get("node_config", {})
    if "acceleratorType" in cfg or "acceleratorConfig" in cfg:
        return "tpu"
    return "gpu" if node_type.get("resources", {}).get("GPU") else "cpu"


def setup_of(prepared: dict[str, Any], name: str) -> list[str]:
    """The commands the autoscaler runs on a node type: a type's own list replaces the merged ones."""
    if name == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][name].get("worker_setup_commands", prepared["worker_setup_commands"])


def ray_config_problems(config: dict[str, Any]) -> list[str]:
    problems = [f"{key}: not set, so Ray's default applies" for key in EXPLICIT_KEYS if key not in config]
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        return [*problems, f"Ray's schema: {'/'.join(map(str, e.absolute_path))}: {e.message}"]
    except (ValueError, KeyError, RuntimeError) as e:
        return [*problems, f"Ray's config check: {e}"]
    problems += start_problems(prepared) + mount_problems(prepared)
    for name, node_type in prepared["available_node_types"].items():
        problems += node_problems(prepared, name, node_type)
    return problems + spot_problems(prepared)


def start_problems(prepared: dict[str, Any]) -> list[str]:
    """The dashboard (and job API) on the head's loopback, nothing bound to every interface."""
    problems = []
    head_start = " ".join(prepared["head_start_ray_commands"])
    if not re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start):
        problems.append("head_start_ray_commands: the dashboard must listen on 127.0.0.1 (reach it by SSH)")
    if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_start:
        problems.append("head_start_ray_commands: without --autoscaling-config no autoscaler replaces lost nodes")
    every = [c for key in ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands", "initialization_commands") for c in prepared[key]]
    every += [c for t in prepared["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    return problems + [f"a command binds 0.0.0.0: {c!r}" for c in every if "0.0.0.0" in c]


def mounted(prepared: dict[str, Any]) -> dict[str, str]:
    """Repository path -> where file_mounts puts it on the nodes."""
    return {str(Path(local)): remote for remote, local in prepared["file_mounts"].items()}


def mount_problems(prepared: dict[str, Any]) -> list[str]:
    problems = []
    user = prepared["auth"].get("ssh_user", "ubuntu")
    for remote, local in prepared["file_mounts"].items():
        if not (ROOT / local).exists():
            problems.append(f"file_mounts: {local} does not exist in the repository")
        if not remote.startswith(f"/home/{user}/"):
            problems.append(f"file_mounts: {remote} is not under /home/{user}")
    needed = ["pyproject.toml", "README.md", *package_dirs()]
    return problems + [f"file_mounts: {path} is not mounted, so the project cannot be installed"
                       for path in needed if path not in mounted(prepared)]


def node_problems(prepared: dict[str, Any], name: str, node_type: dict[str, Any]) -> list[str]:
    """What a node type installs (one environment per cluster: the TPU one wherever a TPU is), and how it
    reaches gs://."""
    problems = []
    kind, text = node_kind(node_type), "\n".join(setup_of(prepared, name))
    where = f"{name} ({kind})"
    tpu_cluster = any(node_kind(t) == "tpu" for t in prepared["available_node_types"].values())
    want_torch = tpu_pins()["torch"] if tpu_cluster else setup_torch()
    project_dir = str(Path(mounted(prepared).get("pyproject.toml", "/nowhere/pyproject.toml")).parent)
    if "source ~/diva-venv/bin/activate" not in text:
        problems.append(f"{where}: does not activate ~/diva-venv, so `ray start` runs outside it")
    if not re.search(r"ray\[default\]==[\w.]+", text):
        problems.append(f"{where}: does not install a pinned ray[default]")
    install = re.search(rf"pip install [^\n]*'?{re.escape(project_dir)}(\[\w+\])?'?", text)
    if not install:
        problems.append(f"{where}: does not install the project from {project_dir}")
    elif (install.group(1) == "[tpu]") != tpu_cluster:
        problems.append(f"{where}: installs the project with extra {install.group(1)}; a "
                        f"{'TPU' if tpu_cluster else 'GPU'} cluster runs one environment on every node")
    torches = set(re.findall(r"\btorch==([\w.]+)", text))
    if torches != {want_torch}:
        problems.append(f"{where}: installs torch {sorted(torches)}, not {want_torch}")
    if (CPU_INDEX in text) == (kind == "gpu"):
        problems.append(f"{where}: a {kind} node needs the {'CUDA' if kind == 'gpu' else 'CPU'} build of torch")
    if kind == "tpu" and f"torch_xla[tpu]=={tpu_pins()['torch_xla']}" not in text:
        problems.append(f"{where}: does not install torch_xla[tpu]=={tpu_pins()['torch_xla']} (libtpu)")
    if name != prepared["head_node_type"]:
        project = prepared["provider"].get("project_id")
        account = node_type["node_config"].get("serviceAccounts", [{}])[0]
        if not account.get("email", "").endswith(f"@{project}.iam.gserviceaccount.com") or \
                CLOUD_PLATFORM not in account.get("scopes", []):
            problems.append(f"{where}: no cloud-platform service account of project {project}, so no gs://")
    if kind == "gpu" and node_type["node_config"].get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
        problems.append(f"{where}: GPU VMs need scheduling.onHostMaintenance: TERMINATE")
    if kind == "tpu":
        problems += tpu_node_problems(where, node_type)
    return problems


def spot_problems(prepared: dict[str, Any]) -> list[str]:
    """Every on-demand TPU slice has a spot twin: the same node_config with schedulingConfig spot."""
    tpus = {n: t["node_config"] for n, t in prepared["available_node_types"].items() if node_kind(t) == "tpu"}
    return [f"{name}: no spot twin (the same node_config with schedulingConfig: {{spot: true}})"
            for name, cfg in tpus.items() if "schedulingConfig" not in cfg
            and {**cfg, "schedulingConfig": {"spot": True}} not in tpus.values()]


def tpu_node_problems(where: str, node_type: dict[str, Any]) -> list[str]:
    acc = node_type["node_config"].get("acceleratorType", "")
    generation = acc.rsplit("-", 1)[0]
    if not TPUAcceleratorManager.is_valid_tpu_accelerator_type(acc) or generation not in tpu.VALID_TPU_TYPES:
        return [f"{where}: acceleratorType {acc!r} is not a TPU type Ray knows"]
    problems = []
    per_host = tpu.get_num_tpu_visible_chips_per_host(acc)
    if node_type["resources"].get("TPU") != per_host:
        problems.append(f"{where}: resources TPU {node_type['resources'].get('TPU')}, but a {acc} host has "
                        f"{per_host} chips")
    if node_type["node_config"].get("runtimeVersion") != TPU_RUNTIME.get(generation):
        problems.append(f"{where}: runtimeVersion {node_type['node_config'].get('runtimeVersion')!r} is not "
                        f"{TPU_RUNTIME.get(generation)!r}, the software version for {generation}")
    return problems


def load_ray_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_every_kind_of_cluster_has_a_ray_up_config():
    kinds = {node_kind(t) for p in RAY_CONFIGS for t in load_ray_config(p)["available_node_types"].values()}
    generations = {t["node_config"]["acceleratorType"].rsplit("-", 1)[0] for p in RAY_CONFIGS
                   for t in load_ray_config(p)["available_node_types"].values() if node_kind(t) == "tpu"}
    assert kinds == {"cpu", "gpu", "tpu"}
    assert generations == {"v4", "v5litepod", "v6e"}


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config(path):
    assert ray_config_problems(load_ray_config(path)) == []
    assert Version(cluster_ray_pin()) in ray_requirement().specifier


def _v6e() -> dict[str, Any]:
    return load_ray_config(INFRA / "ray" / "gcp-tpu-v6e.yaml")


def _public_dashboard(c):
    c["head_start_ray_commands"][-1] = c["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")


def _unknown_key(c):
    c["head_node"] = {"machineType": "n2-standard-8"}


def _bad_chips(c):
    c["available_node_types"]["tpu_v6e_16"]["resources"]["TPU"] = 8


def _no_libtpu(c):
    c["available_node_types"]["tpu_v6e_16"]["worker_setup_commands"] = c["setup_commands"]


def _bad_accelerator(c):
    c["available_node_types"]["tpu_v6e_16"]["node_config"]["acceleratorType"] = "v6x-16"


def _wrong_runtime(c):
    c["available_node_types"]["tpu_v6e_16"]["node_config"]["runtimeVersion"] = "tpu-ubuntu2204-base"


def _no_spot(c):
    del c["available_node_types"]["tpu_v6e_16_spot"]


def _no_autoscaler(c):
    c["head_start_ray_commands"][-1] = c["head_start_ray_commands"][-1].replace(
        "--autoscaling-config=~/ray_bootstrap_config.yaml", "")


def _min_over_max(c):
    c["available_node_types"]["tpu_v6e_16_spot"]["min_workers"] = 1


@pytest.mark.parametrize("damage, expect", [
    (_public_dashboard, "0.0.0.0"),
    (lambda c: c.pop("head_start_ray_commands"), "head_start_ray_commands: not set"),
    (_unknown_key, "Ray's schema"),
    (_bad_chips, "a v6e-16 host has 4 chips"),
    (_no_libtpu, "torch_xla[tpu]"),
    (_bad_accelerator, "not a TPU type Ray knows"),
    (_wrong_runtime, "software version for v6e"),
    (_no_spot, "no spot twin"),
    (_min_over_max, "max_workers"),
    (lambda c: c["file_mounts"].pop("/home/ubuntu/diva/jobs"), "jobs is not mounted"),
    (lambda c: c["provider"].update(project_id="other-project"), "service account of project other-project"),
    (_no_autoscaler, "without --autoscaling-config"),
], ids=["public-dashboard", "default-start", "schema", "chips", "libtpu", "accelerator", "runtime", "spot",
        "min-workers", "mounts", "project", "autoscaler"])
def test_a_damaged_ray_up_config_is_refused(damage, expect):
    config = _v6e()
    damage(config)
    problems = ray_config_problems(config)
    assert any(expect in p for p in problems), problems


def test_a_gpu_node_with_the_cpu_build_of_torch_is_refused():
    config = load_ray_config(INFRA / "ray" / "gcp-gpu.yaml")
    config["available_node_types"]["gpu_a100x8"]["worker_setup_commands"] = config["setup_commands"]
    problems = ray_config_problems(config)
    assert any("gpu_a100x8 (gpu): a gpu node needs the CUDA build" in p for p in problems), problems


# --- jobs: entrypoints must be real jobs with arguments they accept ---------------------------------------

# Runs a job's own argument parser on the arguments and prints what it parsed, stopping before the job
# starts Ray: argparse refuses unknown flags, missing required ones and bad choices exactly as it would.
PARSE_ONLY = """
import argparse, json, runpy, sys
def parse_only(parse):
    def parsed(self, args=None, namespace=None):
        print(json.dumps(vars(parse(self, args, namespace))))
        raise SystemExit(0)
    return parsed
for name in ("parse_args", "parse_intermixed_args"):  # jobs/_common.parse takes the second
    setattr(argparse.ArgumentParser, name, parse_only(getattr(argparse.ArgumentParser, name)))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@functools.cache
def parse_job_args(module: str, args: tuple[str, ...]) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", PARSE_ONLY, module, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return out.returncode, out.stdout if out.returncode == 0 else out.stderr


def entrypoint_problems(command: str, tpu_hosts: int | None = None, gpus: int | None = None) -> list[str]:
    """`python -m jobs.X ...`: a job module of jobs/, arguments its parser takes, a config that loads, and
    workers or actors that fit the cluster (when its TPU hosts or GPUs are given)."""
    argv = shlex.split(command)
    if argv[:2] != ["python", "-m"] or len(argv) < 3 or not argv[2].startswith("jobs."):
        return [f"{command!r}: not `python -m jobs.<stage> ...`"]
    module = argv[2]
    name = module.removeprefix("jobs.")
    if name.startswith("_") or not (ROOT / "jobs" / f"{name}.py").is_file():
        return [f"{command!r}: there is no job {module} in jobs/"]
    rc, out = parse_job_args(module, tuple(argv[3:]))
    if rc != 0:
        return [f"{command!r}: {module} refuses its arguments: {out.strip().splitlines()[-1]}"]
    args = json.loads(out)
    try:
        cfg = _common.config(argparse.Namespace(**args))  # what the job itself would run with
    except ConfigError as e:
        return [f"{command!r}: {e}"]
    problems = []
    if module == "jobs.train":
        workers = cfg.train.num_workers
        if cfg.train.device == "xla" and tpu_hosts is not None and workers != tpu_hosts:
            problems.append(f"{command!r}: train.num_workers={workers}, but xla runs one worker per TPU host and "
                            f"the cluster has {tpu_hosts}")
        if cfg.train.device == "cuda" and gpus is not None and workers > gpus:
            problems.append(f"{command!r}: train.num_workers={workers} on {gpus} GPUs")
    if module == "jobs.cache_teacher":
        if cfg.teacher.device == "cuda" and gpus is not None and cfg.teacher.num_actors > gpus:
            problems.append(f"{command!r}: teacher.num_actors={cfg.teacher.num_actors} on {gpus} GPUs")
    return problems


@pytest.mark.parametrize("command, expect", [
    ("python -m jobs.nope --output x", "there is no job jobs.nope"),
    ("python jobs/train.py", "not `python -m jobs."),
    ("python -m jobs.prepare --inputs gs://b/cv --output gs://b/mels", "refuses its arguments"),
    ("python -m jobs.train --mels a --teacher b", "refuses its arguments"),
    ("python -m jobs.cache_teacher --mels a --output b --device tpu", "refuses its arguments"),
    ("python -m jobs.train --mels a --teacher b --output c train.num_wrkers=4", "unknown key"),
    ("python -m jobs.train --mels a --teacher b --output c train.device=xla train.num_workers=2", "has 4"),
    ("python -m jobs.cache_teacher --config paper --mels a --output b --device cuda", "num_actors=8 on 4 GPUs"),
])
def test_a_wrong_entrypoint_is_refused(command, expect):
    problems = entrypoint_problems(command, tpu_hosts=4, gpus=4)
    assert any(expect in p for p in problems), problems


# --- Ray Serve configs -----------------------------------------------------------------------------------


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """A `serve deploy` config: Serve's own schema, localhost unless deliberately opened, and each application's
    import_path importable with args its builder accepts (pipeline.serve.serve_args, the config overrides
    included) -- everything `serve deploy` would do short of loading the model."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve import serve_args

    try:
        schema = ServeDeploySchema.model_validate(config)
    except Exception as e:  # pydantic's ValidationError
        return [f"not a Serve config: {' '.join(str(e).split())[:300]}"]
    problems = []
    if schema.http_options.host not in ("127.0.0.1", "localhost"):
        problems.append(f"http_options.host {schema.http_options.host!r}: the endpoint is public")
    for app in schema.applications:
        module, _, attr = app.import_path.rpartition(":") if ":" in app.import_path else app.import_path.rpartition(".")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            problems.append(f"{app.name}: import_path {app.import_path!r} does not import: {e}")
            continue
        if not callable(builder):
            problems.append(f"{app.name}: {app.import_path} is not an application builder")
        try:
            serve_args(app.args or {})
        except ConfigError as e:
            problems.append(f"{app.name}: args: {e}")
    return problems


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config(path):
    assert serve_config_problems(load_yaml(path)) == []


@pytest.mark.parametrize("damage, expect", [
    (lambda c: c["applications"][0].update(import_path="pipeline.serve:build_ap"), "does not import"),
    (lambda c: c["applications"][0].update(import_path="pipeline.serv:build_app"), "does not import"),
    (lambda c: c["applications"][0]["args"]["overrides"].append("serve.num_replica=2"), "unknown key"),
    (lambda c: c["applications"][0]["args"]["overrides"].append("serve.port=0"), "serve.port"),
    (lambda c: c["applications"][0]["args"].pop("model"), "`model`"),
    (lambda c: c["http_options"].update(host="0.0.0.0"), "public"),
    (lambda c: c.update(proxy_location="Everywhere"), "not a Serve config"),
])
def test_a_damaged_serve_config_is_refused(damage, expect):
    config = copy.deepcopy(load_yaml(SERVE_CONFIGS[0]))
    damage(config)
    problems = serve_config_problems(config)
    assert any(expect in p for p in problems), problems


# --- images ----------------------------------------------------------------------------------------------


def docker_builds(text: str) -> dict[str, str]:
    """The `docker build` commands a Dockerfile documents, by the tag they build (`-t name:tag`)."""
    joined = re.sub(r"\\\n#\s*", " ", text)
    return {m.group(1): line for line in joined.splitlines() if "docker build" in line
            for m in [re.search(r"-t (\S+)", line)] if m}


def dockerfile_problems(path: Path, text: str) -> list[str]:
    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    base = re.search(r"^FROM (\S+)", text, re.M).group(1).replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
    python = re.match(r"python:(\d+\.\d+)", base)
    if not python or Version(python.group(1)) not in SpecifierSet(pyproject()["project"]["requires-python"]):
        problems.append(f"FROM {base}: not a Python the project supports")
    if args.get("RAY_VERSION") != cluster_ray_pin():
        problems.append(f"RAY_VERSION {args.get('RAY_VERSION')} is not the clusters' Ray {cluster_ray_pin()}")
    if "torch_xla" in text:
        if (args.get("TORCH_VERSION"), args.get("TORCH_XLA_VERSION")) != (tpu_pins()["torch"], tpu_pins()["torch_xla"]):
            problems.append(f"torch {args.get('TORCH_VERSION')} / torch_xla {args.get('TORCH_XLA_VERSION')} are not "
                            f"the `tpu` extra's {tpu_pins()}")
        if '"torch_xla[tpu]==$TORCH_XLA_VERSION"' not in text or "/opt/diva[tpu]" not in text:
            problems.append("does not install torch_xla[tpu] (libtpu) and the project's tpu extra")
    elif args.get("TORCH_VERSION") != setup_torch():
        problems.append(f"TORCH_VERSION {args.get('TORCH_VERSION')} is not scripts/setup.sh's {setup_torch()}")
    ignore = Path(f"{path}.dockerignore")
    kept = ignore.read_text().split() if ignore.exists() else []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in [t for t in line.split()[:-1] if not t.startswith("--")]:
            if not (ROOT / src).exists():
                problems.append(f"COPY {src}: not in the repository")
            if f"!{src}" not in kept and f"!{src}/" not in kept:
                problems.append(f"COPY {src}: {ignore.name} leaves it out of the build context")
    if not re.search(r"apt-get install[^\n]*\bwget\b", re.sub(r"\\\n", " ", text)):
        problems.append("no wget: KubeRay's health probes need it")
    users = re.findall(r"^USER (\S+)", text, re.M)
    if not users or users[-1] in ("root", "0"):
        problems.append("runs as root")
    if not docker_builds(text):
        problems.append("documents no `docker build -t ...` command")
    return problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path):
    assert dockerfile_problems(path, path.read_text()) == []


@pytest.mark.parametrize("old, new, expect", [
    ("ARG TORCH_XLA_VERSION=2.9.0", "ARG TORCH_XLA_VERSION=2.8.0", "tpu` extra"),
    ("COPY jobs /opt/diva/jobs", "COPY scripts /opt/diva/scripts", "leaves it out"),
    ("COPY jobs /opt/diva/jobs", "COPY notthere /opt/diva/notthere", "not in the repository"),
    ("USER ray", "USER root", "runs as root"),
    ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "clusters' Ray"),
])
def test_a_damaged_dockerfile_is_refused(old, new, expect):
    path = INFRA / "docker" / "diva-ray-tpu.Dockerfile"
    text = path.read_text()
    assert old in text
    problems = dockerfile_problems(path, text.replace(old, new))
    assert any(expect in p for p in problems), problems


# --- KubeRay manifests -----------------------------------------------------------------------------------


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, doc) for p in K8S_FILES for doc in yaml.safe_load_all(p.read_text()) if doc]


def built_images() -> dict[str, tuple[Path, str]]:
    """Every `name:tag` a Dockerfile here documents a build of -> (Dockerfile, its build command)."""
    return {tag: (p, cmd) for p in DOCKERFILES for tag, cmd in docker_builds(p.read_text()).items()}


def pod_problems(where: str, template: dict[str, Any], accounts: set[str]) -> list[str]:
    problems = []
    spec = template.get("spec", {})
    if spec.get("hostNetwork"):
        problems.append(f"{where}: hostNetwork puts the Ray ports (8265 too) on the node's network")
    if spec.get("serviceAccountName") not in accounts:
        problems.append(f"{where}: service account {spec.get('serviceAccountName')!r} is not defined in infra/k8s")
    containers = spec.get("containers") or []
    if not containers:
        return [*problems, f"{where}: no containers"]
    images = built_images()
    for c in containers:
        if any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{where}: a hostPort exposes a Ray port on the node")
        resources = c.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for res in ("google.com/tpu", "nvidia.com/gpu"):
            if res in requests and requests[res] != limits.get(res):
                problems.append(f"{where}: {res} requests and limits differ")
    image = containers[0].get("image", "")
    short = image.rsplit("/", 1)[-1]
    if short not in images:
        problems.append(f"{where}: image {image} is not built by a Dockerfile in infra/docker")
    return problems


def accelerator(template: dict[str, Any], resource: str) -> int:
    return int(template["spec"]["containers"][0].get("resources", {}).get("limits", {}).get(resource, 0))


def cluster_problems(where: str, spec: dict[str, Any], accounts: set[str]) -> tuple[list[str], dict[str, int]]:
    """Problems of a RayCluster spec, and what it holds: TPU hosts at its desired size, GPUs at its largest,
    and its TPU slices (topology and Ray's accelerator type)."""
    problems = [f"{where}: unknown field {k}" for k in spec if k not in CLUSTER_SPEC_KEYS]
    facts: dict[str, Any] = {"tpu_hosts": 0, "gpus": 0, "slices": []}
    head = spec.get("headGroupSpec")
    if not head:
        return [*problems, f"{where}: no headGroupSpec"], facts
    problems += [f"{where}.headGroupSpec: unknown field {k}" for k in head if k not in HEAD_KEYS]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: head serviceType {head['serviceType']} exposes the dashboard (8265) outside "
                        f"the cluster; use ClusterIP and kubectl port-forward")
    if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: headService type exposes the dashboard (8265) outside the cluster")
    if head.get("enableIngress"):
        problems.append(f"{where}: enableIngress exposes the dashboard (8265)")
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g.get('groupName')}]", g)
                                           for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.{name}: rayStartParams must map to strings (KubeRay's map[string]string)")
        problems += pod_problems(f"{where}.{name}", group.get("template", {}), accounts)
    if accelerator(head["template"], "google.com/tpu") or accelerator(head["template"], "nvidia.com/gpu"):
        problems.append(f"{where}: the head should not hold accelerators")

    for group in spec.get("workerGroupSpecs", []):
        gw = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        problems += [f"{gw}: unknown field {k}" for k in group if k not in WORKER_KEYS]
        low, want, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if None in (low, high) or not low <= (want if want is not None else low) <= high:
            problems.append(f"{gw}: needs minReplicas <= replicas <= maxReplicas")
        replicas = want or 0
        selector = group["template"].get("spec", {}).get("nodeSelector", {})
        chips = accelerator(group["template"], "google.com/tpu")
        gpus = accelerator(group["template"], "nvidia.com/gpu")
        if chips:
            acc, topology = (selector.get(f"cloud.google.com/gke-tpu-{k}") for k in ("accelerator", "topology"))
            generation = GKE_TPU.get(acc)
            if not generation or not topology:
                problems.append(f"{gw}: TPU pods need gke-tpu-accelerator (one of {sorted(GKE_TPU)}) and "
                                f"gke-tpu-topology node selectors")
                continue
            if topology not in tpu.VALID_TPU_TOPOLOGY[generation]:
                problems.append(f"{gw}: topology {topology} is not a {generation} topology")
                continue
            # How Ray Train reserves this slice: one worker per host, each with the host's chips.
            ray_type = f"TPU-{generation.upper()}"
            hosts, per_worker = get_tpu_worker_resources(topology=topology, accelerator_type=ray_type)
            if chips != per_worker["TPU"]:
                problems.append(f"{gw}: google.com/tpu {chips}, but a {generation} {topology} host has "
                                f"{per_worker['TPU']:g} chips")
            if group.get("numOfHosts", 1) != hosts:
                problems.append(f"{gw}: numOfHosts {group.get('numOfHosts', 1)}, but {topology} is "
                                f"{tpu.get_num_chips_from_topology(topology)} chips on {hosts} hosts")
            facts["tpu_hosts"] += group.get("numOfHosts", 1) * replicas
            facts["slices"].append({"DIVA_XLA_TOPOLOGY": topology, "DIVA_XLA_ACCELERATOR_TYPE": ray_type})
            image_file = built_images().get(group["template"]["spec"]["containers"][0]["image"].rsplit("/", 1)[-1])
            if image_file and "torch_xla[tpu]" not in image_file[0].read_text():
                problems.append(f"{gw}: TPU pods need the torch_xla image")
        if gpus:
            if "cloud.google.com/gke-accelerator" not in selector:
                problems.append(f"{gw}: GPU pods need a cloud.google.com/gke-accelerator node selector")
            image_file = built_images().get(group["template"]["spec"]["containers"][0]["image"].rsplit("/", 1)[-1])
            if image_file and CPU_INDEX in image_file[1]:
                problems.append(f"{gw}: GPU pods need the CUDA build, not {image_file[1]!r}")
            facts["gpus"] += gpus * (high or 0)
    return problems, facts


def k8s_problems(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    accounts = {d["metadata"]["name"] for _, d in docs if d.get("kind") == "ServiceAccount"}
    problems = []
    for name, doc in docs:
        kind, where = doc.get("kind"), f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if kind in ("RayCluster", "RayJob") and doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{where}: apiVersion {doc.get('apiVersion')}, not ray.io/v1")
        if kind == "RayCluster":
            problems += cluster_problems(where, doc.get("spec", {}), accounts)[0]
        elif kind == "RayJob":
            spec = doc.get("spec", {})
            problems += [f"{where}: unknown field {k}" for k in spec if k not in JOB_SPEC_KEYS]
            if not spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{where}: shutdownAfterJobFinishes must be true, or the accelerators outlive the job")
            found, facts = cluster_problems(f"{where}.rayClusterSpec", spec.get("rayClusterSpec", {}), accounts)
            problems += found
            problems += entrypoint_problems(spec.get("entrypoint", ""), facts["tpu_hosts"], facts["gpus"])
            # The slice the xla backend is told to reserve (DIVA_XLA_*, read by pipeline/xla.py) is the
            # slice this cluster has.
            env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
            for key in ("DIVA_XLA_TOPOLOGY", "DIVA_XLA_ACCELERATOR_TYPE"):
                if key in env and env[key] not in {s[key] for s in facts["slices"]}:
                    problems.append(f"{where}: runtime env {key}={env[key]}, but the cluster's slices are "
                                    f"{facts['slices']}")
        elif kind == "Service":
            if doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
                problems.append(f"{where}: a {doc['spec']['type']} Service is reachable from outside the cluster")
        elif kind != "ServiceAccount":
            problems.append(f"{where}: unexpected kind {kind}")
    return problems


def test_kuberay_manifests():
    docs = k8s_docs()
    kinds = {(name, d["kind"]) for name, d in docs}
    assert {k for _, k in kinds} >= {"RayCluster", "RayJob", "ServiceAccount"}
    assert k8s_problems(docs) == []


def test_kuberay_manifests_cover_tpu_slices_and_gpus():
    docs = dict(k8s_docs())
    for name, kind in [("raycluster-tpu.yaml", "RayCluster"), ("rayjob-tpu-train.yaml", "RayJob"),
                       ("raycluster-gpu.yaml", "RayCluster"), ("rayjob-gpu-teacher.yaml", "RayJob")]:
        doc = docs[name]
        assert doc["kind"] == kind
        spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
        facts = cluster_problems(name, spec, {"diva-ray"})[1]
        assert (facts["tpu_hosts"] > 1) == ("tpu" in name), (name, facts)  # TPU: a multi-host slice
        assert (facts["gpus"] >= 8) == ("gpu" in name), (name, facts)


def _doc(name: str) -> dict[str, Any]:
    return copy.deepcopy(dict(k8s_docs())[name])


def _tpu_group(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


def _tpu_container(doc):
    return _tpu_group(doc)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name, damage, expect", [
    ("raycluster-tpu.yaml", lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
     "exposes the dashboard"),
    ("raycluster-tpu.yaml", lambda d: d["spec"]["headGroupSpec"].update(serviceType="NodePort"),
     "exposes the dashboard"),
    ("raycluster-tpu.yaml", lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True), "enableIngress"),
    ("raycluster-tpu.yaml", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][1]
     .update(hostPort=8265), "hostPort"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d).update(numOfHosts=2), "on 4 hosts"),
    ("raycluster-tpu.yaml", lambda d: _tpu_container(d)["resources"]["limits"].update({"google.com/tpu": "8"}),
     "requests and limits differ"),
    ("raycluster-tpu.yaml", lambda d: [_tpu_container(d)["resources"][k].update({"google.com/tpu": "8"})
                                       for k in ("requests", "limits")], "host has 4"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d)["template"]["spec"]["nodeSelector"]
     .pop("cloud.google.com/gke-tpu-topology"), "gke-tpu-topology"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d)["template"]["spec"]["nodeSelector"]
     .update({"cloud.google.com/gke-tpu-topology": "2x2x2"}), "not a v6e topology"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d).update(numOfHost=4), "unknown field numOfHost"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d)["rayStartParams"].update({"num-cpus": 0}), "strings"),
    ("raycluster-tpu.yaml", lambda d: _tpu_container(d).update(image="rayproject/ray:2.60.0"), "not built"),
    ("raycluster-tpu.yaml", lambda d: _tpu_container(d).update(image="x/diva-ray:0.1.0-cuda"), "torch_xla image"),
    ("raycluster-tpu.yaml", lambda d: _tpu_group(d)["template"]["spec"].update(serviceAccountName="nobody"),
     "not defined"),
    ("raycluster-tpu.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "not ray.io/v1"),
    ("rayjob-tpu-train.yaml", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace(
        "train.num_workers=4", "train.num_workers=16")), "the cluster has 4"),
    ("rayjob-tpu-train.yaml", lambda d: d["spec"].update(entrypoint="python -m jobs.trian --output x"),
     "no job jobs.trian"),
    ("rayjob-tpu-train.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "outlive the job"),
    ("rayjob-tpu-train.yaml", lambda d: d["spec"].update(runtimeEnvYAML=d["spec"]["runtimeEnvYAML"].replace(
        "TPU-V6E", "TPU-V4")), "DIVA_XLA_ACCELERATOR_TYPE=TPU-V4"),
    ("rayjob-gpu-teacher.yaml", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0].update(image="x/diva-ray:0.1.0-cpu"), "CUDA build"),
    ("rayjob-gpu-teacher.yaml", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace(
        "teacher.num_actors=8", "teacher.num_actors=16")), "num_actors=16 on 8 GPUs"),
    ("raycluster-gpu.yaml", lambda d: d["spec"]["workerGroupSpecs"][1]["template"]["spec"].pop("nodeSelector"),
     "gke-accelerator"),
])
def test_a_damaged_manifest_is_refused(name, damage, expect):
    docs = [(n, d) for n, d in k8s_docs() if n != name]
    doc = _doc(name)
    damage(doc)
    problems = k8s_problems([*docs, (name, doc)])
    assert any(expect in p for p in problems), problems


def test_a_public_service_is_refused():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    assert any("reachable from outside" in p for p in k8s_problems([*k8s_docs(), ("extra.yaml", service)]))


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_pod_templates_match_the_kubernetes_schema():
    """The core/v1 part of the manifests (containers, resources, selectors) against Kubernetes' own schema."""
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version()
    templates = [t for _, d in k8s_docs() if d["kind"] in ("RayCluster", "RayJob") for t in pod_templates(d)]
    assert templates
    for template in templates:
        kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": template["spec"]},
                    version, strict=True)
    typo = copy.deepcopy(templates[-1])
    typo["spec"]["nodeSelecter"] = typo["spec"].pop("nodeSelector", {})
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": typo["spec"]},
                    version, strict=True)


# --- infra/README.md -------------------------------------------------------------------------------------


def readme_commands(text: str) -> list[str]:
    """Shell commands in the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split(" #")[0].strip() for line in joined.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return commands


def readme_problems(text: str) -> list[str]:
    from ray.dashboard.modules.job.cli import submit

    problems = []
    mentioned = set(re.findall(r"infra/[\w./-]+\w", text))
    problems += [f"{m}: no such file" for m in sorted(mentioned) if not (ROOT / m).exists()]
    for path in [*RAY_CONFIGS, *SERVE_CONFIGS, *K8S_FILES, *DOCKERFILES]:
        if str(path.relative_to(ROOT)) not in mentioned:
            problems.append(f"{path.relative_to(ROOT)} is not described")
    options = {o for p in submit.params for o in p.opts}
    problems += [f"ray job submit has no option {o}" for o in sorted(set(re.findall(r"--entrypoint-[\w-]+", text)))
                 if o not in options]
    jobs = 0
    for command in readme_commands(text):
        if command.startswith("ray job submit"):
            head, _, entrypoint = command.partition(" -- ")
            problems += [f"ray job submit has no option {o}" for o in re.findall(r"(--[\w-]+)", head)
                         if o not in options]
            if not entrypoint:
                problems.append(f"{command!r}: no `-- python -m jobs.<stage>` entrypoint")
        if "python -m jobs." in command:
            jobs += 1
            problems += entrypoint_problems(command[command.index("python -m jobs."):])
    if not jobs:
        problems.append("submits no stage")
    return problems


def test_readme():
    assert readme_problems(README.read_text()) == []


@pytest.mark.parametrize("old, new, expect", [
    ("--submission-id prepare-1", "--submission prepare-1", "no option --submission"),
    ("`--entrypoint-memory`", "`--entrypoint-mem`", "no option --entrypoint-mem"),
    ("python -m jobs.prepare", "python -m jobs.preprocess", "no job jobs.preprocess"),
    ("infra/ray/gcp-gpu.yaml", "infra/ray/gcp-gpus.yaml", "infra/ray/gcp-gpus.yaml: no such file"),
])
def test_a_wrong_readme_is_refused(old, new, expect):
    text = README.read_text()
    assert old in text
    problems = readme_problems(text.replace(old, new))
    assert any(expect in p for p in problems), problems


def test_readme_tpu_table_matches_the_configs():
    rows = re.findall(r"^\| `(gcp-tpu-[\w-]+\.yaml)` \| (.+) \|$", README.read_text(), re.M)
    assert sorted(name for name, _ in rows) == sorted(p.name for p in RAY_CONFIGS if "tpu" in p.name)
    for name, cells in rows:
        acc, topology, hosts_x_chips, runtime, workers, ray_type = (c.strip() for c in cells.split("|"))
        (node,) = [t["node_config"] for t in load_ray_config(INFRA / "ray" / name)["available_node_types"].values()
                   if node_kind(t) == "tpu" and "schedulingConfig" not in t["node_config"]]
        hosts, per_worker = get_tpu_worker_resources(topology=topology, accelerator_type=ray_type)
        assert (node["acceleratorType"], node["runtimeVersion"]) == (acc, runtime)
        assert tpu.infer_tpu_pod_type_from_topology(topology, ray_type) == acc
        assert hosts_x_chips == f"{hosts} x {per_worker['TPU']:g}" and int(workers) == hosts

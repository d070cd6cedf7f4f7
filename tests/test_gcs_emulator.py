"""gs:// through real gcsfs against the local GCS emulator (tests/gcs_emulator.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

from gcs_emulator import GcsEmulator, gcs_emulator

MiB = 1 << 20


def test_small_roundtrip_and_fsspec_open(gcs: GcsEmulator, bucket: str) -> None:
    import fsspec

    fs = gcs.fs()
    fs.pipe(f"{bucket}/small.txt", b"hello emulator")
    assert fs.cat(f"{bucket}/small.txt") == b"hello emulator"
    # The in-process env makes plain gs:// URLs work too, no token or endpoint passed.
    with fsspec.open(f"gs://{bucket}/small.txt", "rb") as f:
        assert f.read() == b"hello emulator"
    with fsspec.open(f"gs://{bucket}/via-url.txt", "w") as f:
        f.write("written by url")
    assert fs.cat(f"{bucket}/via-url.txt") == b"written by url"


def test_10mb_object_resumable_write_and_ranged_read(gcs: GcsEmulator, bucket: str) -> None:
    fs = gcs.fs()
    data = os.urandom(10 * MiB + 12345)
    path = f"{bucket}/big/blob.bin"
    # block_size < size: gcsfs uploads it as a resumable session in several chunks.
    with fs.open(path, "wb", block_size=4 * MiB) as f:
        for i in range(0, len(data), 3 * MiB):
            f.write(data[i : i + 3 * MiB])
    assert fs.info(path)["size"] == len(data)
    assert hashlib.sha256(fs.cat(path)).digest() == hashlib.sha256(data).digest()
    assert fs.cat_file(path, start=7 * MiB, end=7 * MiB + 100) == data[7 * MiB : 7 * MiB + 100]
    with fs.open(path, "rb", block_size=MiB) as f:
        f.seek(9 * MiB)
        assert f.read(1000) == data[9 * MiB : 9 * MiB + 1000]
    # One-shot upload of the same size.
    fs.pipe(f"{bucket}/big/piped.bin", data)
    assert fs.cat(f"{bucket}/big/piped.bin") == data


def test_listing_nested_prefixes(gcs: GcsEmulator, bucket: str) -> None:
    fs = gcs.fs()
    names = ["top.txt", "a/1.txt", "a/b/2.txt", "a/b/c/3.txt", "d/4.txt"]
    fs.pipe({f"{bucket}/root/{n}": n.encode() for n in names})

    assert fs.find(f"{bucket}/root") == sorted(f"{bucket}/root/{n}" for n in names)
    assert fs.find(f"{bucket}/root/a/b") == [f"{bucket}/root/a/b/2.txt", f"{bucket}/root/a/b/c/3.txt"]
    assert sorted(fs.ls(f"{bucket}/root")) == [
        f"{bucket}/root/a",
        f"{bucket}/root/d",
        f"{bucket}/root/top.txt",
    ]
    types = {e["name"]: e["type"] for e in fs.ls(f"{bucket}/root/a/b", detail=True)}
    assert types == {f"{bucket}/root/a/b/2.txt": "file", f"{bucket}/root/a/b/c": "directory"}
    assert fs.exists(f"{bucket}/root/a/b/c/3.txt")
    assert fs.exists(f"{bucket}/root/a/b")  # a "directory" is any common prefix
    assert fs.isdir(f"{bucket}/root/a/b") and fs.isfile(f"{bucket}/root/a/1.txt")
    assert not fs.exists(f"{bucket}/root/a/nope")
    assert not fs.exists(f"{bucket}/root/a/b/c/3.tx")
    assert fs.glob(f"{bucket}/root/**/*.txt") == sorted(f"{bucket}/root/{n}" for n in names)

    # The bucket itself shows up in the bucket listing (after dropping the cached one).
    fs.invalidate_cache()
    assert f"{bucket}/" in fs.ls("")


def test_mv_and_recursive_rm(gcs: GcsEmulator, bucket: str) -> None:
    fs = gcs.fs()
    fs.pipe({f"{bucket}/src/x/{i}.bin": bytes([i]) * 1000 for i in range(5)})

    fs.mv(f"{bucket}/src/x/0.bin", f"{bucket}/src/renamed.bin")  # single object: moveTo API
    assert not fs.exists(f"{bucket}/src/x/0.bin")
    assert fs.cat(f"{bucket}/src/renamed.bin") == b"\x00" * 1000

    fs.mv(f"{bucket}/src/x", f"{bucket}/dst/x", recursive=True)
    assert fs.find(f"{bucket}/dst") == [f"{bucket}/dst/x/{i}.bin" for i in range(1, 5)]
    assert fs.find(f"{bucket}/src/x") == []

    fs.rm(f"{bucket}/dst", recursive=True)
    assert fs.find(f"{bucket}/dst") == []
    assert not fs.exists(f"{bucket}/dst")
    assert fs.find(bucket) == [f"{bucket}/src/renamed.bin"]


def test_parquet_through_fsspec_filesystem(gcs: GcsEmulator, bucket: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = gcs.fs()
    table = pa.table({"id": list(range(50_000)), "text": [f"row {i}" for i in range(50_000)]})
    pq.write_table(table, f"gs://{bucket}/dir/x.parquet", filesystem=fs)
    assert fs.exists(f"{bucket}/dir/x.parquet")
    assert pq.read_table(f"gs://{bucket}/dir/x.parquet", filesystem=fs).equals(table)
    # Same thing as a dataset directory, through a fresh filesystem (nothing cached).
    back = pq.read_table(f"{bucket}/dir", filesystem=gcs.fs())
    assert back.num_rows == table.num_rows
    assert back.sort_by("id").equals(table)


def test_subprocess_with_only_env_sees_same_objects(gcs: GcsEmulator, bucket: str) -> None:
    fs = gcs.fs()
    fs.pipe(f"{bucket}/shared/from-parent.txt", b"parent says hi")
    assert fs.ls(f"{bucket}/shared") == [f"{bucket}/shared/from-parent.txt"]  # now cached

    child = textwrap.dedent(
        f"""
        import fsspec
        with fsspec.open("gs://{bucket}/shared/from-parent.txt", "rb") as f:
            assert f.read() == b"parent says hi", "child read the wrong bytes"
        with fsspec.open("gs://{bucket}/shared/from-child.txt", "wb") as f:
            f.write(b"child says hi")
        import gcsfs
        print(gcsfs.GCSFileSystem.__name__)
        """
    )
    # Nothing of this process's environment but PATH/HOME and the emulator's variables.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "SYSTEMROOT") if k in os.environ}
    env.update(gcs.env)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "GCSFileSystem"  # the plain class, not the gRPC-probing one

    # Another process wrote: this filesystem's listing cache is stale until invalidated.
    fs.invalidate_cache()
    assert fs.cat(f"{bucket}/shared/from-child.txt") == b"child says hi"
    assert fs.ls(f"{bucket}/shared") == [
        f"{bucket}/shared/from-child.txt",
        f"{bucket}/shared/from-parent.txt",
    ]


def test_gcsfs_imported_before_the_emulator_still_works() -> None:
    """gcsfs picked its gs:// class at import; the emulator routes gs:// to the plain one."""
    child = textwrap.dedent(
        """
        import fsspec, gcsfs
        assert gcsfs.GCSFileSystem.__name__ == "ExtendedGcsFileSystem", gcsfs.GCSFileSystem
        from gcs_emulator import gcs_emulator
        with gcs_emulator() as emu:
            emu.make_bucket("early")
            with fsspec.open("gs://early/x.txt", "wb") as f:
                f.write(b"ok")
            assert fsspec.open("gs://early/x.txt").open().read() == b"ok"
        assert fsspec.get_filesystem_class("gs") is gcsfs.GCSFileSystem  # restored
        print("done")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",)}
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    # With the gRPC-probing class each call would take ~60 s: the timeout catches that.
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


def test_emulator_stops_and_restores_env() -> None:
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with gcs_emulator() as emu:
        assert os.environ["STORAGE_EMULATOR_HOST"] == emu.endpoint
        assert emu.alive()
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before
    assert not emu.alive()

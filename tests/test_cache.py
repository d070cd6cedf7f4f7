"""Run bookkeeping shared by every stage: plans, resume scans, the fenced sink, duplicate repair."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cache

GOOD = pa.schema([("id", pa.string()), ("value", pa.int64())])
BAD = pa.schema([("id", pa.string()), ("reason", pa.string())])


def work(ids: list[str], rejected: set[str] = frozenset()) -> pa.Table:
    return pa.table({"id": ids, "value": [len(i) for i in ids],
                     "reason": [("bad" if i in rejected else None) for i in ids]})


def test_begin_records_a_new_run_and_refuses_another_plan(tmp_path):
    url = str(tmp_path / "out")
    plan = {"fingerprint": "a", "content": {"x": 1}}
    assert cache.begin(url, dict(plan), ("data",)) is None
    first = cache.read_json(*cache.filesystem(url + "/_plan.json"))
    assert cache.begin(url, dict(plan), ("data",)) is None
    second = cache.read_json(*cache.filesystem(url + "/_plan.json"))
    assert first["run_id"] != second["run_id"] and first["fingerprint"] == second["fingerprint"]
    with pytest.raises(cache.DatasetError, match=r"x: 1 -> 2"):
        cache.begin(url, {"fingerprint": "b", "content": {"x": 2}}, ("data",))
    cache.write_json(*cache.filesystem(url + "/manifest.json"), {"fingerprint": "a", "kind": "k"})
    assert cache.begin(url, dict(plan), ("data",)) == {"fingerprint": "a", "kind": "k"}


def test_sink_of_a_superseded_run_publishes_nothing(tmp_path):
    url = str(tmp_path / "out")
    plan = {"fingerprint": "a", "content": {}}
    cache.begin(url, plan, ("data", "rejects"))
    stale = cache.split_sink(url, "an-older-run", 1, "data", GOOD, "rejects", BAD)
    assert stale.write([work(["a", "b"])], None) == {"rows": 0, "rejects": 0, "stale": 2}
    assert not list((tmp_path / "out" / "data").iterdir())
    live = cache.split_sink(url, plan["run_id"], 1, "data", GOOD, "rejects", BAD)
    assert live.write([work(["a", "b", "c"], {"c"})], None) == {"rows": 2, "rejects": 1}
    (data,), (rejected,) = (tmp_path / "out" / "data").iterdir(), (tmp_path / "out" / "rejects").iterdir()
    assert data.name == rejected.name
    assert pq.read_table(data).to_pylist() == [{"id": "a", "value": 1}, {"id": "b", "value": 1}]
    assert pq.read_table(rejected).to_pylist() == [{"id": "c", "reason": "bad"}]
    done, removed = cache.done_ids(url, ("data", "rejects"))
    assert done == {"a", "b", "c"} and removed == []


def test_unfinished_files_are_dropped_and_duplicates_repaired(tmp_path):
    fs, root = cache.filesystem(str(tmp_path))
    for name, ids in (("1", ["a", "b"]), ("2", ["b", "c"]), ("3", ["c"])):
        cache.write_parquet(fs, f"{root}/{name}.parquet", pa.table({"id": ids}))
    (tmp_path / "4.parquet").write_bytes(b"PAR1 not a footer")
    (tmp_path / ".5.parquet.tmp-abc").write_bytes(b"partial")
    complete, deleted = cache.drop_incomplete(fs, root)
    assert [p.rsplit("/", 1)[-1] for p in complete] == ["1.parquet", "2.parquet", "3.parquet"]
    assert sorted(p.rsplit("/", 1)[-1] for p in deleted) == [".5.parquet.tmp-abc", "4.parquet"]
    assert cache.drop_duplicate_rows(fs, complete) == 2
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["1.parquet", "2.parquet"]
    assert cache.read_column(fs, cache.parquet_files(fs, root), "id") == ["a", "b", "c"]

"""Issue 13's data-path defects, each reproduced at a small scale: bounded open shards, the
binary index, the manifest journal, JSON lists streamed, int8 token caches."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.mixtures.helpers import make_dataset
from vpit.demo.corpora import write_llava_dataset
from vpit.errors import InputError
from vpit.mixtures.catalog import RecordReader
from vpit.pipelines.ingest import JOURNAL, run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.open_files import OpenFiles
from vpit.pipelines.shard_index import index_arrays, load_shard_arrays
from vpit.pipelines.shards import Dataset, load_manifest

U, G = "understanding", "generation"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """40 shards of 3 samples: more shards than the readers below may keep open."""
    return make_dataset(tmp_path_factory.mktemp("many") / "ds", "many", [[U, G, U]] * 40)


def test_the_lru_never_holds_more_than_its_bound_even_with_threads(tmp_path):
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]) * 10)
    held = []

    def opener(i):
        fd = os.open(paths[i], os.O_RDONLY)
        held.append(fd)
        return fd, i

    lru = OpenFiles(opener, capacity=4)
    peak = [0]

    def reader(seed):
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, 30, 300).tolist():
            with lru.use(i) as (fd, value):
                assert value == i and os.pread(fd, 1, 0) == bytes([i])  # never a closed or reused fd
                peak[0] = max(peak[0], len(lru))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 4 and lru.opened > 30  # it evicted and reopened, and never held more than 4
    lru.close()
    for fd in held:  # every descriptor it opened is closed again
        with pytest.raises(OSError):
            os.fstat(fd)


def test_record_reader_keeps_a_bounded_number_of_shards_open(many_shards):
    manifest = load_manifest(many_shards)
    names = tuple(s["name"] for s in manifest["shards"])
    before = _open_fds()
    reader = RecordReader(many_shards, names, open_shards=5)
    ids = [reader.record(s, p)["id"] for s in range(40) for p in range(3)]
    assert len(set(ids)) == 120
    assert _open_fds() - before <= 5 and len(reader.files) <= 5  # was: 40, one per shard touched
    reader.close()
    assert _open_fds() == before


def test_the_binary_index_matches_the_json_index_and_is_smaller(many_shards):
    ds = Dataset(many_shards)
    for entry in ds.shards[:3]:
        name = entry["name"]
        binary = load_shard_arrays(many_shards, name)
        from_json = index_arrays(json.loads((many_shards / "shards" / f"{name}.idx.json").read_text()))
        for field in ("json", "kind", "ids", "id_hash", "image_start", "images"):
            np.testing.assert_array_equal(getattr(binary, field), getattr(from_json, field))
        assert binary.image_sha.all()  # the writer knows the images' sha256, the JSON fallback does not
        reader = ds.reader(entry["shard"])
        for p in range(len(reader)):
            sample = reader.read(p)
            assert binary.sample_id(p) == sample.record["id"]
            assert [int(h[:16], 16) for h in (i["sha256"] for i in sample.record["images"])] == list(
                binary.image_sha[binary.image_start[p] : binary.image_start[p + 1]]
            )


def test_a_tar_whose_size_disagrees_with_its_index_is_refused_by_name(tmp_path):
    root = make_dataset(tmp_path / "ds", "cut", [[U, U]])
    tar = root / "shards" / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    reader = RecordReader(root, ("shard-000000",))
    with pytest.raises(InputError, match=r"shard-000000.tar is \d+ bytes but its index says \d+.*vpit verify"):
        reader.record(0, 0)


def _ingest(inp: Path, raw: Path, out: Path, shard_size: int = 7):
    cfg = LlavaConfig(input=str(inp), image_root=str(raw), source="shapes", shard_size=shard_size)
    return run_ingest(LlavaAdapter(cfg), out, workers=2, progress=False)


def test_a_json_list_and_the_same_records_as_jsonl_give_byte_identical_shards(tmp_path, ray_local):
    info = write_llava_dataset(tmp_path / "raw", 30, seed=5)
    records = [json.loads(line) for line in info["jsonl"].read_text().splitlines()]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the same file name (the name is part of each sample's lineage); a pretty-printed JSON list
    # with a non-ASCII record, so byte offsets and character offsets differ
    records[3]["conversations"][1]["value"] += " — très bien"
    (tmp_path / "a" / "data.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "b" / "data.json").write_text(json.dumps(records, indent=2, ensure_ascii=False))
    _ingest(tmp_path / "a" / "data.json", tmp_path / "raw", tmp_path / "jsonl")
    _ingest(tmp_path / "b" / "data.json", tmp_path / "raw", tmp_path / "list")
    tars = sorted((tmp_path / "jsonl" / "shards").glob("*.tar"))
    assert len(tars) == 5
    for tar in tars:
        assert tar.read_bytes() == (tmp_path / "list" / "shards" / tar.name).read_bytes()


def test_a_json_list_is_planned_without_holding_its_records(tmp_path):
    """The driver's plan is byte ranges, not inlined records (was: every record in the task list)."""
    from vpit.pipelines.tabular import plan_rows, read_rows

    records = [{"id": i, "text": "x" * (i % 50), "nested": {"a": [1, 2, {"b": "]}"}]}} for i in range(23)]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, indent=1))
    tasks = plan_rows(path, 5)
    assert [t["records"] for t in tasks] == [[0, 5], [5, 10], [10, 15], [15, 20], [20, 23]]
    assert all(set(t) == {"records", "json_list"} for t in tasks) and len(json.dumps(tasks)) < 300
    got = [json.loads(raw) for t in tasks for _, _, raw in read_rows(path, t)]
    assert got == records


@pytest.mark.parametrize(
    "text, match",
    [
        ('[{"a": 1}, {"a": 2] ', "malformed JSON near byte 18: Expecting .,. delimiter"),
        ('[{"a": 1} {"a": 2}]', "expected ',' or ']'"),
        ('[{"a": 1},', "malformed JSON near byte 10: Expecting value"),
    ],
)
def test_a_broken_json_list_is_one_clear_error(tmp_path, text, match):
    from vpit.pipelines.ingest import IngestError
    from vpit.pipelines.tabular import plan_rows

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(IngestError, match=match):
        plan_rows(path, 10)


def test_the_manifest_journal_appends_and_a_torn_line_resumes(tmp_path, ray_local):
    info = write_llava_dataset(tmp_path / "raw", 40, seed=2)
    out = tmp_path / "ds"
    _ingest(info["jsonl"], tmp_path / "raw", out, shard_size=5)
    full = load_manifest(out)
    assert full["complete"] and len(full["shards"]) == 8 and not (out / JOURNAL).exists()
    reference = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}

    # A run killed in the middle of appending shard 5's entry: manifest.json has shards 0-2, the
    # journal 3 and 4 whole and a torn line for 5; shards 6 and 7 never finished.
    first = dict(full, shards=full["shards"][:3], complete=False, samples=15)
    (out / "manifest.json").write_text(json.dumps(first))
    journal = b"".join(json.dumps(e).encode() + b"\n" for e in full["shards"][3:5])
    torn = json.dumps(full["shards"][5]).encode()[:40]
    (out / JOURNAL).write_bytes(journal + torn)
    for name in ("shard-000006", "shard-000007"):
        (out / "shards" / f"{name}.idx.json").unlink()
    report = _ingest(info["jsonl"], tmp_path / "raw", out, shard_size=5)
    assert (report.shards_skipped, report.shards_written) == (5, 3)  # 0-4 kept, 5 (torn) redone, 6-7 done
    again = load_manifest(out)
    assert again == full and not (out / JOURNAL).exists()
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == reference
    ids = [s.record["origin"]["record_id"] for s in Dataset(out)]
    assert sorted(ids) == sorted(info["ids"])  # none lost, none twice

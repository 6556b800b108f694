"""LLaVA ingest: bad cases quarantined exactly, good samples round-trip, workers don't matter."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from vpit.demo.corpora import BAD_LLAVA_CASES, write_bad_llava_records, write_llava_dataset
from vpit.pipelines.ingest import IngestError, run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.shards import Dataset

N_GOOD = 40


def _mixed_input(tmp: Path, with_bad: list | None = None) -> tuple[Path, Path, list[dict]]:
    """N_GOOD good records with the bad ones spliced in between; returns (jsonl, root, good records).
    The raw bad lines are appended to `with_bad` when given."""
    raw = tmp / "raw"
    info = write_llava_dataset(raw, N_GOOD, seed=3)
    good = [json.loads(line) for line in info["jsonl"].read_text().splitlines()]
    bad = write_bad_llava_records(raw, bomb_side=1100)
    lines = [json.dumps(r).encode() for r in good]
    for j, b in enumerate(bad):  # spread the bad lines over several shards
        lines.insert(3 * j + 1, b)
    if with_bad is not None:
        with_bad.extend(bad)
    lines.insert(5, b"")  # a blank line is not a record: neither a sample nor quarantined
    path = raw / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, raw, good


def _ingest(jsonl: Path, root: Path, out: Path, workers: int = 2, **kw):
    cfg = LlavaConfig(input=str(jsonl), image_root=str(root), source="shapes", shard_size=8, max_pixels=1_000_000, **kw)
    return run_ingest(LlavaAdapter(cfg), out, workers=workers, progress=False)


def _expected_messages(rec: dict) -> list[dict]:
    """The sample-format messages for a good LLaVA record, written out independently of the adapter."""
    out = []
    if "system" in rec:
        out.append({"role": "system", "content": [{"text": rec["system"]}]})
    image = 0
    for turn in rec["conversations"]:
        content = []
        text = turn["value"]
        while "<image>" in text:
            before, text = text.split("<image>", 1)
            if before.strip():
                content.append({"text": before.strip()})
            content.append({"image": image})
            image += 1
        if text.strip():
            content.append({"text": text.strip()})
        out.append({"role": {"human": "user", "gpt": "assistant"}[turn["from"]], "content": content})
    return out


def test_bad_records_quarantined_good_round_trip(tmp_path, ray_local):
    bad: list[bytes] = []
    jsonl, root, good = _mixed_input(tmp_path, bad)
    report = _ingest(jsonl, root, tmp_path / "ds")

    assert report.samples == N_GOOD
    assert report.quarantined == {
        "empty_conversation": 1,
        "image_too_large": 1,
        "malformed_json": 1,
        "missing_image": 1,
        "non_utf8": 1,
        "one_sided_conversation": 1,
        "path_escape": 1,
        "placeholder_mismatch": 1,
        "unknown_role": 1,
        "unreadable_image": 2,
    }
    assert sum(report.quarantined.values()) == len(BAD_LLAVA_CASES)

    ds = Dataset(tmp_path / "ds")
    quarantine = ds.quarantine()
    assert [q["reason"] for q in quarantine] == list(BAD_LLAVA_CASES)  # input order, one line each
    raw_lines = jsonl.read_bytes().split(b"\n")
    assert [raw_lines[q["origin"]["line"] - 1] for q in quarantine] == bad  # lineage back to the raw line
    details = {q["reason"]: q["detail"] for q in quarantine}
    assert "image" in details["missing_image"] and "does-not-exist.png" in details["missing_image"]
    assert "conversations[1].from = 'robot'" in details["unknown_role"]
    assert "conversations[1].value is empty" in details["empty_conversation"]
    assert "2 <image> placeholder(s) but image lists 1 file(s)" in details["placeholder_mismatch"]
    assert "outside the image root" in details["path_escape"]
    assert "1100x1100" in details["image_too_large"]
    assert "0xe9" in details["non_utf8"]

    samples = {s.record["origin"]["record_id"]: s for s in ds}
    assert sorted(samples) == sorted(r["id"] for r in good)
    for rec in good:
        s = samples[rec["id"]]
        assert s.record["messages"] == _expected_messages(rec)
        paths = rec.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        assert [i["sha256"] for i in s.record["images"]] == [
            hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths
        ]
        assert [hashlib.sha256(b).hexdigest() for b in s.images] == [i["sha256"] for i in s.record["images"]]
        assert s.record["kind"] == ("understanding" if paths else "text")
        line = jsonl.read_bytes().split(b"\n")[s.record["origin"]["line"] - 1]
        assert json.loads(line)["id"] == rec["id"]
    assert ds.manifest["kinds"] == dict(Counter(s.record["kind"] for s in samples.values()))
    assert ds.manifest["complete"] is True


def test_worker_count_gives_byte_identical_output(tmp_path, ray_local):
    jsonl, root, _ = _mixed_input(tmp_path)
    _ingest(jsonl, root, tmp_path / "w1", workers=1)
    _ingest(jsonl, root, tmp_path / "w2", workers=2)

    def tree(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    one, two = tree(tmp_path / "w1"), tree(tmp_path / "w2")
    assert sorted(one) == sorted(two)
    assert len([k for k in one if k.endswith(".tar")]) == 7  # 51 input lines / 8 per shard
    for name in one:
        assert one[name] == two[name], name


def test_rerun_of_finished_dataset_does_nothing(tmp_path, ray_local):
    jsonl, root, _ = _mixed_input(tmp_path)
    _ingest(jsonl, root, tmp_path / "ds")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").iterdir()}
    again = _ingest(jsonl, root, tmp_path / "ds")
    assert again.shards_written == 0 and again.shards_skipped == again.shards_total == 7
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / "shards").iterdir()} == before
    assert again.samples == N_GOOD


def test_partial_shard_is_redone(tmp_path, ray_local):
    jsonl, root, _ = _mixed_input(tmp_path)
    _ingest(jsonl, root, tmp_path / "ds")
    tar = tmp_path / "ds" / "shards" / "shard-000003.tar"
    expected = tar.read_bytes()
    tar.write_bytes(expected[:1000])  # as if the disk lost the end of it
    report = _ingest(jsonl, root, tmp_path / "ds")
    assert report.shards_written == 1
    assert tar.read_bytes() == expected


def test_changed_config_is_refused(tmp_path, ray_local):
    jsonl, root, _ = _mixed_input(tmp_path)
    _ingest(jsonl, root, tmp_path / "ds")
    cfg = LlavaConfig(input=str(jsonl), image_root=str(root), source="shapes", shard_size=16, max_pixels=1_000_000)
    with pytest.raises(IngestError, match=r"another config \(differs in: shard_size\)"):
        run_ingest(LlavaAdapter(cfg), tmp_path / "ds", progress=False)


def test_json_list_input_gives_same_samples(tmp_path, ray_local):
    raw = tmp_path / "raw"
    info = write_llava_dataset(raw, 20, seed=5)
    records = [json.loads(line) for line in info["jsonl"].read_text().splitlines()]
    as_list = raw / "data.json"
    as_list.write_text(json.dumps(records, indent=2))
    _ingest(info["jsonl"], raw, tmp_path / "from_jsonl")
    _ingest(as_list, raw, tmp_path / "from_list")
    a = [(s.record["messages"], s.images) for s in Dataset(tmp_path / "from_jsonl")]
    b = [(s.record["messages"], s.images) for s in Dataset(tmp_path / "from_list")]
    assert a == b and len(a) == 20
    assert Dataset(tmp_path / "from_list").read(0, 0).record["origin"] == {
        "uri": "data.json",
        "line": 1,  # the record's number from 1: its line in JSONL, its element in a JSON list
        "record_id": "shapes-000000",
    }


def test_malformed_json_list_is_a_user_error(tmp_path, ray_local):
    bad = tmp_path / "data.json"
    bad.write_text('[{"id": 1},\n {"id": 2')
    cfg = LlavaConfig(input=str(bad), image_root=str(tmp_path), shard_size=8)
    with pytest.raises(IngestError, match=r"malformed JSON near byte 21: "):
        run_ingest(LlavaAdapter(cfg), tmp_path / "ds", progress=False)


def test_random_access_matches_iteration(tmp_path, ray_local):
    jsonl, root, _ = _mixed_input(tmp_path)
    _ingest(jsonl, root, tmp_path / "ds")
    ds = Dataset(tmp_path / "ds")
    in_order = [(s.record, s.images) for s in ds]
    by_position = [
        (ds.read(i, p).record, ds.read(i, p).images) for i, sh in enumerate(ds.shards) for p in range(sh["samples"])
    ]
    assert by_position == in_order
    assert len(in_order) == len(ds) == N_GOOD
    # reading backwards by position (random access, no scan) gives the same samples
    last = len(ds.shards) - 1
    assert ds.read(last, ds.shards[last]["samples"] - 1).record == in_order[-1][0]

"""Our shards open unchanged with the three readers people already use."""

from __future__ import annotations

import json

import pytest

from vpit.demo.corpora import write_llava_dataset
from vpit.pipelines.ingest import run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.shards import Dataset

N = 24


def _drop_none(x):
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("interop")
    info = write_llava_dataset(tmp / "raw", N, seed=11)
    cfg = LlavaConfig(input=str(info["jsonl"]), image_root=str(tmp / "raw"), source="shapes", shard_size=10)
    run_ingest(LlavaAdapter(cfg), tmp / "ds", progress=False)
    return Dataset(tmp / "ds")


def test_webdataset_reads_shards(dataset):
    import webdataset as wds

    ours = {s.record["key"]: s for s in dataset}
    seen = 0
    for sample in wds.WebDataset(dataset.tar_paths(), shardshuffle=False):
        record = json.loads(sample["json"])
        mine = ours[sample["__key__"]]
        assert record == mine.record
        assert [sample[img["member"]] for img in record["images"]] == mine.images
        seen += 1
    assert seen == N


def test_ray_data_reads_shards(dataset, ray_local):
    import ray

    rows = ray.data.read_webdataset(dataset.tar_paths(), decoder=None).take_all()
    assert len(rows) == N
    by_key = {r["__key__"]: r for r in rows}
    for s in dataset:
        row = by_key[s.record["key"]]
        assert json.loads(row["json"]) == s.record
        assert [row[img["member"]] for img in s.record["images"]] == s.images


def test_hf_datasets_reads_shards(dataset, tmp_path):
    import datasets

    from vpit.pipelines.interop import hf_features

    hf = datasets.load_dataset(
        "webdataset",
        data_files={"train": dataset.tar_paths()},
        split="train",
        features=hf_features(dataset.root),
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(hf) == N
    ids = sorted(row["json"]["id"] for row in hf)
    assert ids == sorted(s.id for s in dataset)
    first = next(iter(dataset))
    row = next(r for r in hf if r["json"]["key"] == first.record["key"])
    # Arrow structs hold every key, absent ones as None; with those dropped the record is ours
    assert _drop_none(row["json"]) == first.record
    assert row["img0.png"].size == (first.record["images"][0]["width"], first.record["images"][0]["height"])
    # every image of every sample is there, under its member name, with its bytes' size
    n_images = sum(1 for r in hf for k in r if k.startswith("img") and r[k] is not None)
    assert n_images == sum(len(s.images) for s in dataset)


def test_the_records_parquet_beside_each_tar_holds_its_json_members_and_opens_with_ray_and_datasets(
    dataset, ray_local, tmp_path
):
    import datasets
    import ray

    files = [p.replace(".tar", ".records.parquet") for p in dataset.tar_paths()]
    rows = ray.data.read_parquet(files).take_all()
    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    ours = [s.record for s in dataset]  # in shard order, as each file's rows are
    assert [json.loads(j) for j in hf["json"]] == ours
    rows.sort(key=lambda r: r["key"])  # Ray reads the files in any order
    assert [json.loads(r["json"]) for r in rows] == sorted(ours, key=lambda r: r["key"])
    assert all((r["id"], r["kind"]) == (json.loads(r["json"])["id"], json.loads(r["json"])["kind"]) for r in rows)

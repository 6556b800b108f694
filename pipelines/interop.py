"""Helpers for opening our shards with other libraries' readers.

`datasets.load_dataset("webdataset", ...)` infers its schema from the first five samples and
refuses tars whose samples carry different members. Ours legitimately do (text-only samples
have no image, some have two, formats differ), so we hand it the schema instead: the union
of member names from the shard indexes (images typed as `datasets.Image`) and the JSON
record's type as pyarrow infers it over records spread across the shards.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["hf_features"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


def hf_features(root: str | Path, max_records: int = 2000):
    """The `datasets.Features` of a vpit dataset, for `load_dataset("webdataset", features=...)`."""
    import datasets
    import pyarrow as pa

    from vpit.pipelines.shards import Dataset

    ds = Dataset(root)
    fields: set[str] = set()
    for i in range(len(ds.shards)):
        for entry in ds.reader(i).json_index()["samples"]:
            fields.update(entry["members"])
    # Records spread evenly over the dataset, so a field that only some sources write is seen.
    total = len(ds)
    step = max(1, total // max_records)
    records, seen = [], 0
    for i, shard in enumerate(ds.shards):
        for pos in range(shard["samples"]):
            if seen % step == 0:
                records.append(ds.read(i, pos).record)
            seen += 1
    json_type = pa.Table.from_pylist([{"json": r} for r in records]).schema.field("json").type
    features = datasets.Features.from_arrow_schema(pa.schema([pa.field("json", json_type)]))
    for name in sorted(fields - {"json"}):
        features[name] = datasets.Image() if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS else datasets.Value("binary")
    return features

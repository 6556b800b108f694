"""The dataset card: DATASET/README.md, so a dataset folder explains itself and opens with
`datasets.load_dataset(FOLDER)` alone.

Its YAML header is the Hugging Face Hub's dataset-card metadata (written with
huggingface_hub's `DatasetCardData`): `configs` points the webdataset builder at
`shards/*.tar` (the indexes, caches and catalog beside them are not data files), and
`dataset_info.features` declares the schema. Declaring it is what makes the folder load:
`datasets` otherwise infers a schema from the first samples and refuses the tars, whose samples
legitimately carry different members (no image, two images, PNG or JPEG). The body gives the
counts per kind, the quarantine by reason, the ingest config and the input's fingerprint, and
the licence and citation the user set at ingest (`--license`, `--citation`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vpit import storage
from vpit.records import Manifest

__all__ = ["CARD", "card_metadata", "features_for", "write_card"]

CARD = "README.md"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")
_RECORDS_FOR_SCHEMA = 2000


def features_for(root: Path, manifest: Manifest):
    """`datasets.Features` of a dataset: the JSON record's type as pyarrow infers it over records
    spread evenly across the shards (so a field only some sources write is seen), and every
    member name any shard holds (from the manifest; from the indexes for an older dataset)."""
    import datasets
    import pyarrow as pa

    from vpit.pipelines.shard_index import load_shard_arrays
    from vpit.pipelines.shards import Dataset

    shards = manifest["shards"]
    members: set[str] = set()
    for i, entry in enumerate(shards):
        if "members" in entry:
            members.update(entry["members"])
        else:  # written before manifests listed members
            for sample in Dataset(root).reader(i).json_index()["samples"]:
                members.update(sample["members"])
    counts = np.array([e["samples"] for e in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    picks = np.unique(np.linspace(0, total - 1, min(total, _RECORDS_FOR_SCHEMA)).round().astype(np.int64))
    spans = []
    shard_of = np.searchsorted(starts, picks, side="right") - 1
    for s in np.unique(shard_of):  # each shard's index read once, its records read by offset
        arrays = load_shard_arrays(root, shards[s]["name"], shards[s]["tar_sha256"])
        for g in picks[shard_of == s]:
            offset, size = arrays.json[int(g - starts[s])]
            spans.append((f"shards/{shards[s]['name']}.tar", int(offset), int(size)))
    records = [json.loads(b) for b in storage.read_ranges(root, spans)]  # ranged GETs on object storage
    json_type = pa.Table.from_pylist([{"json": r} for r in records]).schema.field("json").type
    features = datasets.Features.from_arrow_schema(pa.schema([pa.field("json", json_type)]))
    for name in sorted(members - {"json"}):
        features[name] = datasets.Image() if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS else datasets.Value("binary")
    return features


def card_metadata(root: Path, manifest: Manifest, license: str | None) -> str:
    """The card's YAML header (without the --- fences). Without a schema (an empty dataset, or
    records whose fields change type) it leaves the features out: the card is still written."""
    import pyarrow as pa
    from huggingface_hub import DatasetCardData

    info = {}
    if manifest["samples"]:
        try:
            info = {"dataset_info": {"features": features_for(root, manifest)._to_yaml_list()}}
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError, ValueError):
            info = {}
    data = DatasetCardData(
        license=license or "other",
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        **info,
        tags=["vpit", "webdataset", *sorted(manifest.get("kinds", {}))],
    )
    return data.to_yaml()


def write_card(root: Path, manifest: Manifest, license: str | None = None, citation: str | None = None) -> Path:
    """Write DATASET/README.md from the finished manifest (whole, then renamed into place; on object
    storage one PUT)."""
    root = storage.as_root(root)
    config = manifest.get("config", {})
    reasons: Counter = Counter()
    for entry in manifest["shards"]:
        reasons.update(entry.get("quarantined", {}))
    kinds = manifest.get("kinds", {})
    lines = [
        "---",
        card_metadata(root, manifest, license).rstrip(),
        "---",
        "",
        f"# {config.get('source', str(root).rstrip('/').rsplit('/', 1)[-1])}",
        "",
        f"A vpit instruction dataset: {manifest['samples']:,} samples in {len(manifest['shards']):,} WebDataset "
        f"shards (`shards/*.tar`), written by `vpit ingest {config.get('adapter', '')}`.",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("path/to/this/folder", split="train")',
        "```",
        "",
        "## Samples per kind",
        "",
        "| kind | samples |",
        "| --- | --- |",
        *(f"| {k} | {v:,} |" for k, v in sorted(kinds.items())),
        "",
        "## Quarantined input records (not in the shards; one line each in quarantine.jsonl)",
        "",
        *(
            ["| reason | records |", "| --- | --- |", *(f"| {r} | {n:,} |" for r, n in reasons.most_common())]
            if reasons
            else ["none"]
        ),  # fmt: skip
        "",
        "## Ingest",
        "",
        f"Input fingerprint (sha256): `{config.get('input_sha256', 'unknown')}`",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Licence",
        "",
        license or "Not set at ingest (`vpit ingest ... --license ID`): check the licence of the input.",
        "",
        "## Citation",
        "",
        *(["```bibtex", citation.strip(), "```"] if citation else ["Not set at ingest (`--citation TEXT`)."]),
        "",
    ]
    if storage.is_remote(root):
        storage.put_bytes(root, CARD, "\n".join(lines).encode("utf-8"))
        return storage.join(root, CARD)
    path = root / CARD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


def read_card(root: Path) -> dict[str, Any] | None:
    """The card's YAML header as a mapping, or None without a card."""
    import yaml

    try:
        text = storage.read_bytes(storage.as_root(root), CARD).decode("utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if not text.startswith("---\n"):
        return None
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:]) or {}

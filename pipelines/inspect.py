"""Render a dataset as text: the manifest summary, some samples with lineage, quarantine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vpit import storage
from vpit.config import path_field
from vpit.pipelines.shard_index import load_shard_arrays
from vpit.pipelines.shards import Dataset

__all__ = ["InspectConfig", "describe_dataset", "render_sample"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class InspectConfig:
    path: str = path_field()
    """Dataset folder (holds manifest.json), or its URL (s3://...)."""
    n: int = 3
    """Samples to render."""
    quarantine: int = 5
    """Quarantine lines to show."""


def render_sample(record: dict) -> str:
    """One sample as a human reads it: roles, text, and images marked input or target."""
    lines = [f"── {record['id']}  [{record['kind']}]  from {record['origin']}"]
    for msg in record["messages"]:
        parts = []
        for part in msg["content"]:
            if "text" in part:
                parts.append(part["text"])
            else:
                img = record["images"][part["image"]]
                role = "target" if msg["role"] == "assistant" else "input"
                parts.append(f"<image {part['image']}: {img['member']} {img['width']}x{img['height']} {role}>")
        lines.append(f"  {msg['role']:>9}: " + " ".join(parts).replace("\n", "\n" + " " * 13))
    return "\n".join(lines)


def _card_line(root: Path) -> str:
    from vpit.pipelines.card import CARD, read_card

    meta = read_card(root)
    if meta is None:
        return "card     none (written when an ingest completes)"
    body = storage.read_bytes(root, CARD).decode("utf-8")
    cited = "set" if "```bibtex" in body else "not set"
    return (
        f"card     {CARD}: license {meta.get('license', 'other')}, citation {cited}; "
        f'datasets.load_dataset("{root}") opens it'
    )


def describe_dataset(path: str | Path, n: int = 3, quarantine: int = 5) -> str:
    ds = Dataset(path)
    m = ds.manifest
    out = [
        f"dataset  {ds.root}",
        "config   " + ", ".join(f"{k}={v}" for k, v in sorted(m["config"].items()) if k != "input_sha256"),
        f"status   {'complete' if m['complete'] else 'INCOMPLETE (re-run the ingest command to finish)'}: "
        f"{len(m['shards'])}/{m['shards_planned']} shards",
        f"samples  {m['samples']}: " + ", ".join(f"{k} {v}" for k, v in m["kinds"].items()),
        f"quarantined {sum(m['quarantined'].values())}"
        + "".join(f"\n  {r:<24} {c}" for r, c in m["quarantined"].items()),
        _card_line(ds.root),
        "",
    ]
    spans, left = [], n  # the first n records, read by offset (ranged GETs on object storage)
    for entry in ds.shards:
        if left <= 0:
            break
        arrays = load_shard_arrays(ds.root, entry["name"], entry["tar_sha256"])
        for pos in range(min(entry["samples"], left)):
            offset, size = arrays.json[pos]
            spans.append((f"shards/{entry['name']}.tar", int(offset), int(size)))
        left -= entry["samples"]
    out += [render_sample(json.loads(data)) for data in storage.read_ranges(ds.root, spans)]
    bad = ds.quarantine()[:quarantine]
    if bad:
        out.append("\nquarantine (first %d):" % len(bad))
        out += [f"  {q['reason']:<24} {q['origin']}  {q['detail']}" for q in bad]
    return "\n".join(out)

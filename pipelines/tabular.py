"""Row-range reading of tabular inputs (JSONL, JSON list, parquet), for adapters whose shards
are fixed ranges of input rows.

`plan_rows` runs once on the driver and splits the file into tasks `records: [first, end)`;
`read_rows` yields one task's rows in input order. JSONL tasks carry byte ranges, so a worker
reads only its part; parquet tasks read only the row groups that overlap their range.
JSONL rows come back as raw bytes (the adapter parses them, so a malformed line is the
adapter's quarantine entry, not a crash); parquet rows come back as dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpit.pipelines.ingest import IngestError

__all__ = ["input_format", "plan_rows", "read_rows", "first_row_fields"]


def input_format(path: Path) -> str:
    """'parquet', 'json' (a JSON list) or 'jsonl', from the file's name and first byte."""
    if path.suffix == ".parquet":
        return "parquet"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def _load_json_list(path: Path) -> list[Any]:
    # A JSON list is one document: if it does not parse, no record can be trusted.
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IngestError(
            f"{path}: not a valid JSON list ({e}); use JSONL to quarantine bad lines one by one"
        ) from None
    if not isinstance(records, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def plan_rows(path: Path, shard_size: int) -> list[dict[str, Any]]:
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
        return [{"records": [i, min(i + shard_size, n)]} for i in range(0, n, shard_size)]
    if fmt == "json":
        records = _load_json_list(path)
        return [
            {
                "records": [i, min(i + shard_size, len(records))],
                "inline": [json.dumps(r, ensure_ascii=False) for r in records[i : i + shard_size]],
            }
            for i in range(0, len(records), shard_size)
        ]
    # JSONL: the byte offset of every shard_size-th line start, found in one streaming pass.
    starts, line, pos = [0], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            line += 1
            pos += len(raw)
            if line % shard_size == 0:
                starts.append(pos)
    if starts[-1] != pos:
        starts.append(pos)
    return [
        {"records": [i * shard_size, min((i + 1) * shard_size, line)], "bytes": [starts[i], starts[i + 1]]}
        for i in range(len(starts) - 1)
    ]


def read_rows(path: Path, task: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], Any]]:
    """Yield (row index, origin, row) for one task: row is bytes (JSON/JSONL) or a dict (parquet)."""
    first, end = task["records"]
    uri = path.name
    if "inline" in task:
        for j, text in enumerate(task["inline"]):
            yield first + j, {"uri": uri, "record": first + j}, text.encode("utf-8")
    elif "bytes" in task:
        start, stop = task["bytes"]
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read(stop - start).split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for j, raw in enumerate(lines):
            yield first + j, {"uri": uri, "line": first + j + 1}, raw
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > first and row < end:
                for j, rec in enumerate(pf.read_row_group(g).to_pylist()):
                    if first <= row + j < end:
                        yield row + j, {"uri": uri, "row": row + j}, rec
            row += n


def first_row_fields(path: Path) -> list[str]:
    """Field names of the input (parquet schema, or the first JSON object), for layout detection."""
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if fmt == "json":
        records = _load_json_list(path)
        return sorted(records[0]) if records and isinstance(records[0], dict) else []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return []
                return sorted(obj) if isinstance(obj, dict) else []
    return []

"""Row-range reading of tabular inputs (JSONL, JSON list, parquet), for adapters whose shards
are fixed ranges of input rows.

`plan_rows` runs once on the driver and splits the file into tasks `records: [first, end)`;
`read_rows` yields one task's rows in input order. JSONL and JSON-list tasks carry byte
ranges, so a worker reads only its part and the driver holds no record: a JSON list is
scanned once, element by element (`scan_json_list`), with memory bounded by the largest
element. Parquet tasks read only the row groups that overlap their range.
JSON rows come back as raw bytes (the adapter parses them, so a malformed line is the
adapter's quarantine entry, not a crash); parquet rows come back as dicts.

Lineage: a JSON row's origin is {"uri": file name, "line": n}, n counting records from 1: the
line in JSONL, the element in a JSON list, so the same records give the same samples in
either format.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpit.pipelines.ingest import IngestError

__all__ = ["input_format", "plan_rows", "read_rows", "first_row_fields", "scan_json_list"]

BOM = codecs.BOM_UTF8
_BLOCK = 1 << 24  # bytes read at a time while scanning a JSON list
_WS = " \t\r\n"


def input_format(path: Path) -> str:
    """'parquet', 'json' (a JSON list) or 'jsonl', from the file's name and first byte."""
    if path.suffix == ".parquet":
        return "parquet"
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


class _Text:
    """A window on a UTF-8 file as text, with the byte offset of every position it has seen."""

    def __init__(self, f, start: int = 0):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.base = 0  # buf[0] is at this character position of the stream
        self.pos = 0  # current character position, relative to buf
        self.byte = start  # byte offset of buf[pos]
        self.eof = False

    def more(self) -> bool:
        if self.eof:
            return False
        block = self.f.read(_BLOCK)
        try:
            self.buf += self.decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise IngestError(f"{self.f.name}: not UTF-8 near byte {self.byte + e.start}") from None
        self.eof = not block
        return True

    def advance(self, to: int) -> None:
        self.byte += len(self.buf[self.pos : to].encode("utf-8"))
        self.pos = to
        if self.pos > _BLOCK:  # drop what is behind us
            self.buf, self.base, self.pos = self.buf[self.pos :], self.base + self.pos, 0

    def skip_ws(self) -> str:
        """The next non-blank character ('' at the end of the file), without consuming it."""
        while True:
            n = len(self.buf)
            i = self.pos
            while i < n and self.buf[i] in _WS:
                i += 1
            self.advance(i)
            if i < n:
                return self.buf[i]
            if not self.more():
                return ""

    def value(self) -> tuple[int, int]:
        """Consume one JSON value; return its [start, end) byte range. A value must be followed by
        at least one character in the buffer (or the file's end), so a number is never cut."""
        decoder = json.JSONDecoder()
        last_error = None
        self.skip_ws()  # raw_decode takes no leading blanks
        while True:
            try:
                _, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    start = self.byte
                    self.advance(end)
                    return start, self.byte
            except json.JSONDecodeError as e:
                # An error that more data does not move is in the data, not at the buffer's end
                # (an unterminated string is the exception: its error points at its start).
                here = (e.pos, e.msg)
                if self.eof or (here == last_error and not e.msg.startswith("Unterminated string")):
                    at = self.byte + len(self.buf[self.pos : e.pos].encode("utf-8"))
                    raise IngestError(
                        f"{self.f.name}: malformed JSON near byte {at}: {e.msg}; a JSON list must be valid "
                        "as a whole (use JSONL to quarantine bad records one by one)"
                    ) from None
                last_error = here
            except RecursionError:
                raise IngestError(
                    f"{self.f.name}: the element at byte {self.byte} is nested too deeply to parse; "
                    "a JSON list must be valid as a whole (use JSONL to quarantine bad records one by one)"
                ) from None
            self.more()


def scan_json_list(path: Path) -> Iterator[tuple[int, int]]:
    """The [start, end) byte range of every element of the JSON list in `path`, in one pass."""
    with open(path, "rb") as f:
        start = len(BOM) if f.read(len(BOM)) == BOM else 0
        f.seek(start)
        text = _Text(f, start)
        if text.skip_ws() != "[":
            raise IngestError(f"{path}: expected a JSON list of records (starting with '[')")
        text.advance(text.pos + 1)
        if text.skip_ws() == "]":
            return
        while True:
            yield text.value()
            c = text.skip_ws()
            if c == "]":
                return
            if c != ",":
                raise IngestError(f"{path}: expected ',' or ']' after the element ending at byte {text.byte}")
            text.advance(text.pos + 1)


def plan_rows(path: Path, shard_size: int) -> list[dict[str, Any]]:
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
        return [{"records": [i, min(i + shard_size, n)]} for i in range(0, n, shard_size)]
    if fmt == "json":  # the byte range of every shard_size-th element, found in one pass
        tasks, n, first_start, end = [], 0, 0, 0
        for start, end in scan_json_list(path):
            if n % shard_size == 0:
                first_start = start
            n += 1
            if n % shard_size == 0:
                tasks.append({"records": [n - shard_size, n], "json_list": [first_start, end]})
        if n % shard_size:
            tasks.append({"records": [n - n % shard_size, n], "json_list": [first_start, end]})
        return tasks
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
    if "json_list" in task:
        start, stop = task["json_list"]
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        text, pos, decoder = data.decode("utf-8"), 0, json.JSONDecoder()
        for j in range(end - first):
            while text[pos] in _WS or text[pos] == ",":
                pos += 1
            _, stop_at = decoder.raw_decode(text, pos)
            yield first + j, {"uri": uri, "line": first + j + 1}, text[pos:stop_at].encode("utf-8")
            pos = stop_at
    elif "bytes" in task:
        start, stop = task["bytes"]
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        if start == 0:  # a byte-order mark some editors write is not part of the first record
            data = data.removeprefix(BOM)
        lines = data.split(b"\n")
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
        for start, stop in scan_json_list(path):
            with open(path, "rb") as f:
                f.seek(start)
                obj = json.loads(f.read(stop - start))
            return sorted(obj) if isinstance(obj, dict) else []
        return []
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.removeprefix(BOM)
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return []
                return sorted(obj) if isinstance(obj, dict) else []
    return []

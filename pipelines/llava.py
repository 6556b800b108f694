"""LLaVA / Cambrian-format records -> understanding (or text-only) instruction samples.

Input: a JSON list or a JSONL file of records
    {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] | absent, "system": optional,
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", ...}]}
with image paths relative to an image root. The i-th `<image>` placeholder is image i.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpit.config import path_field
from vpit.pipelines.ingest import Adapter, IngestError, RawRecord, check_adapter_config, file_sha256
from vpit.pipelines.sample import Rejected, Sample, image_entry, split_placeholders
from vpit.pipelines.tabular import plan_rows, read_rows

__all__ = ["LlavaConfig", "LlavaAdapter", "ROLE_MAP", "read_image_under_root"]

# LLaVA writes human/gpt; ShareGPT-style data writes user/assistant. Anything else is rejected.
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LlavaConfig:
    input: str = path_field()
    """JSON list or JSONL file of LLaVA-format records."""
    image_root: str = path_field()
    """Folder that image paths are relative to; no path may leave it."""
    source: str = "llava"
    """Source name: the prefix of every sample id."""
    shard_size: int = 1000
    """Input records per shard (the last shard may hold fewer)."""
    max_pixels: int = 64 * 1024 * 1024
    """Images with more pixels are quarantined unread (decompression-bomb guard)."""

    def __post_init__(self):
        check_adapter_config(self)


def read_image_under_root(root: Path, rel: Any, field: str) -> bytes:
    """Read an image file that must lie under `root`; raise `Rejected` naming `field`."""
    if not isinstance(rel, str) or not rel:
        raise Rejected("missing_field", f"{field}: expected a non-empty path string, got {rel!r}")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise Rejected("path_escape", f"{field} = {rel!r} resolves outside the image root {str(root)!r}")
    if not path.is_file():
        raise Rejected("missing_image", f"{field} = {rel!r}: no such file under the image root")
    return path.read_bytes()


class LlavaAdapter(Adapter):
    """Adapter for LLaVA-format JSON lists and JSONL: shards are byte ranges of the file (`tabular`)."""

    source_kind = "llava"

    def __init__(self, config: LlavaConfig):
        self.config = config
        self.input = Path(config.input)
        self.image_root = Path(config.image_root)
        if not self.input.is_file():
            raise IngestError(f"input: {config.input!r} is not a file")
        if not self.image_root.is_dir():
            raise IngestError(f"--image-root: {config.image_root!r} is not a folder")

    def input_fingerprint(self) -> str:
        return file_sha256(self.input)

    def plan(self) -> list[dict[str, Any]]:
        return plan_rows(self.input, self.config.shard_size)

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        for index, origin, raw in read_rows(self.input, task):
            yield RawRecord(index, origin, raw)

    def convert(self, rec: RawRecord) -> Sample | None:
        record = _parse(rec.raw)
        if record is None:  # a blank line is not a record: nothing is lost
            return None
        return self.to_sample(record, rec, kind_if_images="understanding")

    def to_sample(self, record: dict[str, Any], rec: RawRecord, *, kind_if_images: str) -> Sample:
        """Validate a parsed LLaVA record and build the sample (shared with video QA)."""
        cfg = self.config
        paths = record.get("image")
        if paths is None:
            paths = []
        elif isinstance(paths, str):
            paths = [paths]
        elif not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
            raise Rejected("missing_field", f"image: expected a path or a list of paths, got {paths!r}")
        messages = _messages(record, len(paths))
        images, entries = [], []
        for i, rel in enumerate(paths):
            field = "image" if isinstance(record.get("image"), str) else f"image[{i}]"
            data = read_image_under_root(self.image_root, rel, field)
            entries.append(image_entry(i, data, f"{field} ({rel})", cfg.max_pixels))
            images.append(data)
        origin = dict(rec.origin)
        if "id" in record:
            origin["record_id"] = str(record["id"])
        # An <image> in an assistant turn is a prediction target: reasoning text then an image is
        # MetaMorph's "visual thinking" ("the animal with 2+7 lives" -> a cat).
        thinking = any("image" in part for m in messages if m["role"] == "assistant" for part in m["content"])
        out = {
            "id": f"{cfg.source}:{rec.index:09d}",
            "source": cfg.source,
            "kind": ("thinking" if thinking else kind_if_images) if images else "text",
            "messages": messages,
            "images": entries,
            "origin": origin,
        }
        return Sample(record=out, images=images)


MAX_RECORD_BYTES = 16 * 1024 * 1024  # a raw record larger than this is refused unparsed (a runaway line)


def _parse(raw: bytes) -> dict[str, Any] | None:
    """One raw JSON record -> a dict, or None for a blank line; `Rejected` names what is wrong.

    A UTF-8 byte-order mark is not part of the record; a record over MAX_RECORD_BYTES is refused
    before parsing; JSON nested past Python's recursion limit is malformed, not a crash."""
    if len(raw) > MAX_RECORD_BYTES:
        raise Rejected("record_too_large", f"{len(raw):,} bytes; records over {MAX_RECORD_BYTES:,} bytes are refused")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise Rejected("non_utf8", f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start} of the record") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("malformed_json", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise Rejected("malformed_json", "nested too deeply to parse (a JSON recursion bomb)") from None
    if not isinstance(record, dict):
        raise Rejected("malformed_json", f"expected a JSON object, got {type(record).__name__}")
    try:  # lone surrogates (\udc80) parse but cannot be written as UTF-8
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected("non_utf8", f"text holds an unpaired surrogate {e.object[e.start]!r}") from None
    return record


def _messages(record: dict[str, Any], n_images: int) -> list[dict[str, Any]]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise Rejected("missing_field", f"conversations: expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise Rejected("empty_conversation", "conversations is an empty list")
    messages: list[dict[str, Any]] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str) or not system.strip():
            raise Rejected("missing_field", f"system: expected a non-empty string, got {system!r}")
        messages.append({"role": "system", "content": [{"text": system.strip()}]})
    next_image = 0
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise Rejected("missing_field", f"conversations[{j}]: expected an object with 'from' and 'value'")
        who = turn.get("from", turn.get("role"))
        if who not in ROLE_MAP:
            raise Rejected("unknown_role", f"conversations[{j}].from = {who!r}; expected one of {sorted(ROLE_MAP)}")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise Rejected("missing_field", f"conversations[{j}].value: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise Rejected("empty_conversation", f"conversations[{j}].value is empty")
        content = split_placeholders(value, next_image)
        next_image += value.count("<image>")
        if not content:
            raise Rejected("empty_conversation", f"conversations[{j}].value holds no text")
        messages.append({"role": ROLE_MAP[who], "content": content})
    roles = {m["role"] for m in messages}
    for needed, raw_name in (("user", "human"), ("assistant", "gpt")):
        if needed not in roles:
            raise Rejected("one_sided_conversation", f"conversations has no '{raw_name}' turn")
    if next_image != n_images:
        raise Rejected(
            "placeholder_mismatch",
            f"conversations hold {next_image} <image> placeholder(s) but image lists {n_images} file(s)",
        )
    return messages

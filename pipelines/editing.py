"""Image-editing triplets (source image, instruction, target image) -> editing samples.

Input: JSONL or parquet, one triplet per row. The layout names the three fields:
`generic` (source, instruction, target), `instructpix2pix` (original_image, edit_prompt,
edited_image) and `magicbrush` (source_img, instruction, target_img); `auto` picks the one
whose fields the input has. An image is a path (relative to the image root), inline bytes,
or a {"bytes", "path"} struct as Hugging Face datasets store images in parquet (in JSONL the
bytes are base64). The sample: user [source image, instruction], assistant ["Here is the
edited image:", target image]. A missing source or target, and a target identical to its
source (same bytes or same pixels), go to quarantine.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpit.config import path_field
from vpit.errors import ConfigError
from vpit.pipelines.ingest import Adapter, IngestError, RawRecord, check_adapter_config
from vpit.pipelines.llava import _parse, read_image_under_root
from vpit.pipelines.sample import Rejected, Sample, image_entry
from vpit.pipelines.tabular import first_row_fields, plan_rows, read_rows
from vpit.pipelines.templates import load_templates

__all__ = ["EditingConfig", "EditingAdapter", "LAYOUTS"]

# layout -> (source field, instruction field, target field), as the public datasets name them.
LAYOUTS = {
    "generic": ("source", "instruction", "target"),
    "instructpix2pix": ("original_image", "edit_prompt", "edited_image"),
    "magicbrush": ("source_img", "instruction", "target_img"),
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EditingConfig:
    input: str = path_field()
    """JSONL or parquet file of triplets."""
    image_root: str | None = path_field(None)
    """Folder that image paths are relative to (default: the input's folder); no path may leave it."""
    layout: str = "auto"
    """Field names: auto, generic, instructpix2pix or magicbrush."""
    source: str = "editing"
    """Source name: the prefix of every sample id."""
    shard_size: int = 1000
    """Input rows per shard."""
    templates: str | None = path_field(None)
    """Prompt templates YAML; none: the built-in templates/generation.yaml."""
    template_seed: int = 0
    """Seed of the per-sample template choice."""
    max_pixels: int = 64 * 1024 * 1024
    """Images with more pixels are quarantined."""

    def __post_init__(self):
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise ConfigError(f"layout: expected auto or one of {sorted(LAYOUTS)}, got {self.layout!r}")
        check_adapter_config(self)


class EditingAdapter(Adapter):
    source_kind = "editing"

    def __init__(self, config: EditingConfig):
        self.input = Path(config.input)
        if not self.input.is_file():
            raise IngestError(f"input: {config.input!r} is not a file")
        self.image_root = Path(config.image_root) if config.image_root else self.input.parent
        if not self.image_root.is_dir():
            raise IngestError(f"--image-root: {str(self.image_root)!r} is not a folder")
        if config.layout == "auto":  # resolved once here, so the manifest records what was used
            config = dataclasses.replace(config, layout=self._detect_layout())
        self.config = config
        self.fields = LAYOUTS[config.layout]
        self.templates = load_templates(config.templates)

    def _detect_layout(self) -> str:
        names = set(first_row_fields(self.input))
        for layout, fields in LAYOUTS.items():
            if set(fields) <= names:
                return layout
        known = "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items())
        raise IngestError(f"{self.input.name}: fields {sorted(names)} match no layout ({known}); pass --layout")

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.source_kind,
            **dataclasses.asdict(self.config),
            "templates_sha256": self.templates.sha256,
        }

    def input_fingerprint(self) -> str:
        h = hashlib.sha256()
        with open(self.input, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()

    def plan(self) -> list[dict[str, Any]]:
        return plan_rows(self.input, self.config.shard_size)

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        for index, origin, raw in read_rows(self.input, task):
            yield RawRecord(index, origin, raw)

    def _image(self, row: dict[str, Any], field: str) -> bytes:
        value = row.get(field)
        if isinstance(value, dict):  # HF Image struct: bytes win over path, as in `datasets`
            if value.get("bytes") is not None:
                value, field = value["bytes"], f"{field}.bytes"
            elif value.get("path"):
                value, field = value["path"], f"{field}.path"
            else:
                raise Rejected("missing_field", f"{field}: neither bytes nor path is set")
        if value is None or value == "":
            raise Rejected("missing_field", f"{field}: the image is missing")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and field.endswith(".bytes"):  # JSONL cannot hold bytes: base64
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise Rejected("unreadable_image", f"{field}: not valid base64") from None
        return read_image_under_root(self.image_root, value, field)

    def convert(self, rec: RawRecord) -> Sample | None:
        cfg = self.config
        row = rec.raw if isinstance(rec.raw, dict) else _parse(rec.raw)
        if row is None:
            return None
        src_f, ins_f, tgt_f = self.fields
        instruction = row.get(ins_f)
        if not isinstance(instruction, str) or not instruction.strip():
            raise Rejected("missing_field", f"{ins_f}: expected a non-empty instruction, got {instruction!r}")
        source = self._image(row, src_f)
        target = self._image(row, tgt_f)
        entries = [image_entry(0, source, src_f, cfg.max_pixels), image_entry(1, target, tgt_f, cfg.max_pixels)]
        if entries[0]["sha256"] == entries[1]["sha256"] or _same_pixels(source, target):
            raise Rejected("identical_images", f"{tgt_f} is identical to {src_f}: the edit changes nothing")
        prompt = self.templates.user("editing", self.key(rec), cfg.template_seed, instruction=instruction.strip())
        origin = dict(rec.origin)
        for id_field in ("id", "img_id"):
            if row.get(id_field) is not None:
                origin["record_id"] = str(row[id_field])
                break
        record = {
            "id": f"{cfg.source}:{rec.index:09d}",
            "source": cfg.source,
            "kind": "editing",
            "messages": [
                {"role": "user", "content": [{"image": 0}, {"text": prompt}]},
                {"role": "assistant", "content": [{"text": self.templates.assistant("editing")}, {"image": 1}]},
            ],
            "images": entries,
            "origin": origin,
        }
        return Sample(record=record, images=[source, target])


def _same_pixels(a: bytes, b: bytes) -> bool:
    # Re-encoding (PNG vs JPEG, other compression) changes bytes but not the edit: compare pixels.
    ia, ib = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
    if ia.size != ib.size:
        return False
    return bool(np.array_equal(np.asarray(ia.convert("RGB")), np.asarray(ib.convert("RGB"))))

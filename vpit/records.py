"""The records that cross stage boundaries, as typed dicts (ARCHITECTURE.md, "the instruction sample").

They stay plain dicts at run time, because they are JSON on disk (tar members, indexes,
manifests, quarantine lines) and travel through Ray and DataLoader workers; the types say
what every stage may rely on, and a type checker holds the stages to it.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import numpy as np

__all__ = [
    "ImageEntry",
    "ImagePart",
    "Kind",
    "Manifest",
    "Message",
    "Part",
    "QuarantineLine",
    "Record",
    "ShardEntry",
    "ShardIndex",
    "ShardIndexSample",
    "StreamItem",
    "TextPart",
]

Kind = Literal["understanding", "generation", "video", "editing", "thinking", "text"]
Role = Literal["system", "user", "assistant"]


class TextPart(TypedDict):
    text: str


class ImagePart(TypedDict):
    image: int
    """Index into the record's `images`; in an assistant message, a prediction target."""


Part = TextPart | ImagePart


class Message(TypedDict):
    role: Role
    content: list[Part]


class ImageEntry(TypedDict):
    member: str
    """Tar member suffix, e.g. img0.jpg (the bytes as they came)."""
    sha256: str
    width: int
    height: int


class Record(TypedDict):
    """One instruction sample's JSON member."""

    id: str
    """`source:index`, unique in a dataset."""
    source: str
    kind: Kind
    messages: list[Message]
    images: list[ImageEntry]
    origin: dict[str, Any]
    """Lineage: the raw record's file and line/row (and its own id as record_id when it has one)."""
    key: NotRequired[str]
    """The sample's key in its tar (added by the shard writer)."""
    caption: NotRequired[str]
    """Generation samples: the caption the prompt was made from."""


class QuarantineLine(TypedDict):
    reason: str
    """One of vpit.pipelines.sample.REASONS."""
    detail: str
    origin: dict[str, Any]


class ShardIndexSample(TypedDict):
    key: str
    id: str
    kind: Kind
    members: dict[str, list[int]]
    """Member suffix -> [byte offset of the data, size] in the tar."""


class ShardIndex(TypedDict):
    format_version: int
    shard: str
    tar: str
    tar_bytes: int
    tar_sha256: str
    kinds: dict[str, int]
    samples: list[ShardIndexSample]


class ShardEntry(TypedDict):
    """A shard's line in the manifest: written after its index, it marks the shard done."""

    name: str
    shard: int
    samples: int
    kinds: dict[str, int]
    tar_bytes: int
    tar_sha256: str
    quarantined: dict[str, int]
    records: list[int]
    """[first, end) input records the shard covers."""


class Manifest(TypedDict):
    format: str
    format_version: int
    config: dict[str, Any]
    config_hash: str
    shards_planned: int
    complete: bool
    samples: int
    kinds: dict[str, int]
    quarantined: dict[str, int]
    shards: list[ShardEntry]


class StreamItem(TypedDict):
    """What the mixture stream yields per sample (and held-out evaluation reads)."""

    index: int
    """Position in the run's global sample sequence (-1 for held-out items)."""
    id: str
    source: str
    group: str
    record: Record
    tokens: NotRequired[np.ndarray]
    """(n_images, m, d) float32 visual tokens from the token cache."""
    phase: NotRequired[str]
    """The mixture phase this sample is drawn for (a batch at a phase boundary holds two)."""
    micro: NotRequired[int]
    """The micro step of the optimizer step this item trains in (when a step has several)."""

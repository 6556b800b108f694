"""What a source can draw from, and how to read one item of it without scanning a tar.

A `Catalog` numbers a source's eligible samples 0..size-1 in shard order (after the
optional `kind` filter) and maps that number to (shard, position) with one binary
search. It is built from the manifest alone when no filter is set or a shard holds one
kind only; only shards that mix kinds have their index read.

`RecordReader` reads a sample's JSON through the shard index with `os.pread`: no shared
file offset, so the prefetching threads can read from the same file at once (the
pipelines `ShardReader` seeks then reads, which is not thread-safe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from vpit.errors import ConfigError
from vpit.pipelines.shards import load_manifest
from vpit.records import Record, ShardIndex

__all__ = ["Catalog", "RecordReader", "build_catalog", "is_heldout"]


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """The eligible samples of one source, numbered in shard order."""

    root: Path
    """Dataset folder."""
    shard_names: tuple[str, ...]
    """Shard names in manifest order."""
    offsets: np.ndarray
    """int64, len(shards) + 1: eligible samples before each shard (a cumulative sum)."""
    picks: dict[int, np.ndarray]
    """For shards only partly eligible: the eligible positions within the shard."""
    fingerprint: str
    """Hash of the shards' checksums and the filter: what the numbering depends on."""
    kinds: dict[str, int]
    """Samples per kind in the whole dataset (for messages)."""

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position) arrays for eligible-sample numbers `items`."""
        items = np.asarray(items, dtype=np.int64)
        shard = np.searchsorted(self.offsets, items, side="right") - 1
        pos = items - self.offsets[shard]
        for s, picks in self.picks.items():
            sel = shard == s
            if sel.any():
                pos[sel] = picks[pos[sel]]
        return shard, pos


def _read_index(root: Path, name: str) -> ShardIndex:
    return json.loads((root / "shards" / f"{name}.idx.json").read_text(encoding="utf-8"))


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the held-out split: a hash of its id, so the split is the
    same for every mixture, seed and machine, and a sample never moves between splits."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"vpit-heldout:{sample_id}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


def build_catalog(
    root: str | Path, kind: str | None, where: str, heldout: float = 0.0, split: str = "train"
) -> Catalog:
    """The catalog of dataset `root` filtered to `kind`. Errors name `where` (e.g. sources.vqa.path).

    With `heldout` > 0 the samples whose id hashes below it are left out (split "train") or
    are the only ones kept (split "heldout"); the ids come from the shard indexes.
    """
    root = Path(root)
    manifest = load_manifest(root) if root.is_dir() else None
    if manifest is None:
        why = "does not exist" if not root.exists() else "holds no manifest.json"
        raise ConfigError(f"{where}: {root} {why}; point it at a dataset folder written by vpit ingest")
    if not manifest.get("complete", True):
        raise ConfigError(
            f"{where}: {root} is only partly ingested ({len(manifest['shards'])} of "
            f"{manifest.get('shards_planned')} shards); re-run its vpit ingest command to finish it"
        )
    counts, picks = [], {}
    for i, shard in enumerate(manifest["shards"]):
        n_kind = shard["samples"] if kind is None else shard["kinds"].get(kind, 0)
        if heldout > 0 and n_kind > 0:
            entries = _read_index(root, shard["name"])["samples"]
            keep = [
                p
                for p, e in enumerate(entries)
                if (kind is None or e["kind"] == kind) and is_heldout(e["id"], heldout) == (split == "heldout")
            ]
            if len(keep) < shard["samples"]:
                picks[i] = np.array(keep, dtype=np.int64)
            n_kind = len(keep)
        elif 0 < n_kind < shard["samples"]:
            entries = _read_index(root, shard["name"])["samples"]
            picks[i] = np.array([p for p, e in enumerate(entries) if e["kind"] == kind], dtype=np.int64)
        counts.append(n_kind)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    split_key = [kind] if heldout <= 0 else [kind, heldout, split]  # unchanged hashes for specs without a split
    h = hashlib.sha256(
        json.dumps([*split_key, [(s["name"], s["samples"], s["tar_sha256"]) for s in manifest["shards"]]]).encode()
    ).hexdigest()[:16]
    return Catalog(
        root=root,
        shard_names=tuple(s["name"] for s in manifest["shards"]),
        offsets=offsets,
        picks=picks,
        fingerprint=h,
        kinds=dict(manifest.get("kinds", {})),
    )


class RecordReader:
    """Thread-safe random reads of sample JSON records from one dataset's shards."""

    def __init__(self, root: str | Path, shard_names: tuple[str, ...]):
        self.root = Path(root)
        self.names = shard_names
        self._members: dict[int, list[tuple[int, int]]] = {}
        self._ids: dict[int, list[str]] = {}
        self._images: dict[int, list[int]] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _open(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                if shard not in self._fds:
                    idx = _read_index(self.root, self.names[shard])
                    self._members[shard] = [tuple(e["members"]["json"]) for e in idx["samples"]]
                    self._ids[shard] = [e["id"] for e in idx["samples"]]
                    self._images[shard] = [sum(k.startswith("img") for k in e["members"]) for e in idx["samples"]]
                    self._fds[shard] = os.open(self.root / idx["tar"], os.O_RDONLY)
                fd = self._fds[shard]
        return fd

    def record(self, shard: int, position: int) -> Record:
        fd = self._open(shard)
        offset, size = self._members[shard][position]
        return json.loads(os.pread(fd, size, offset))

    def sample_id(self, shard: int, position: int) -> str:
        """The sample's id from the index alone (no tar read)."""
        self._open(shard)
        return self._ids[shard][position]

    def cost(self, shard: int, position: int, m: int) -> int:
        """Estimated tokens of a sample from the index alone: JSON bytes / 4 + images x (m + 2)."""
        self._open(shard)
        return self._members[shard][position][1] // 4 + self._images[shard][position] * (m + 2)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

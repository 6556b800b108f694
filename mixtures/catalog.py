"""What a source can draw from, and how to read one item of it without scanning a tar.

A `Catalog` numbers a source's eligible samples 0..size-1 in dataset order (after the
optional `kind` filter and the held-out split). Eligible sample i is global sample
`picks[i]` of the dataset (or i itself when every sample is eligible), and a global sample
number maps to (shard, position) by one binary search over the shard starts: O(log shards)
per item, whatever the number of shards.

Building a catalog reads the manifest, and, for a `kind:` filter over shards that mix kinds
or for a held-out split, the dataset's `catalog/` arrays (kind, id hash), written once at
ingest: never a shard index.

`RecordReader` reads a sample's JSON with `os.pread` through the shard's binary index, keeping
at most `DEFAULT_OPEN_SHARDS` shards open (`pipelines.open_files`): no shared file offset, so
the prefetching threads read from the same file at once, and no descriptor or index is kept
for every shard a long run touches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from vpit import storage
from vpit.errors import ConfigError
from vpit.pipelines.open_files import DEFAULT_OPEN_SHARDS, OpenFiles
from vpit.pipelines.sample import KINDS
from vpit.pipelines.shard_index import heldout_hash, load_catalog_arrays, load_shard_arrays
from vpit.pipelines.shards import load_manifest, open_tar, read_records_parquet, records_path
from vpit.records import Record

__all__ = ["Catalog", "RecordReader", "build_catalog", "heldout_threshold", "is_heldout"]


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """The eligible samples of one source, numbered in dataset order."""

    root: str | Path
    """Dataset folder, or its URL on object storage."""
    shard_names: tuple[str, ...]
    """Shard names in manifest order."""
    shard_starts: np.ndarray
    """int64, len(shards) + 1: the global number of each shard's first sample (a cumulative sum)."""
    picks: np.ndarray | None
    """int64, sorted: the global numbers of the eligible samples; None when every sample is."""
    fingerprint: str
    """Hash of the shards' checksums and the filter: what the numbering depends on."""
    kinds: dict[str, int]
    """Samples per kind in the whole dataset (for messages)."""
    shard_versions: tuple[str, ...] = ()
    """Each shard's tar_sha256: names the content of a remote shard's files in the node cache."""

    @property
    def size(self) -> int:
        return int(self.shard_starts[-1]) if self.picks is None else len(self.picks)

    def global_numbers(self, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        return items if self.picks is None else np.asarray(self.picks[items], dtype=np.int64)

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position) arrays for eligible-sample numbers `items`."""
        g = self.global_numbers(items)
        shard = np.searchsorted(self.shard_starts, g, side="right") - 1
        return shard, g - self.shard_starts[shard]


def heldout_threshold(fraction: float) -> int:
    """Samples whose held-out hash is below this integer are held out (h < fraction * 2^64)."""
    return math.ceil(fraction * 2**64) if fraction > 0 else 0


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the held-out split: a hash of its id, so the split is the
    same for every mixture, seed and machine, and a sample never moves between splits."""
    return heldout_hash(sample_id) < heldout_threshold(fraction)


def build_catalog(
    root: str | Path,
    kind: str | None,
    where: str,
    heldout: float = 0.0,
    split: str = "train",
    held: np.ndarray | None = None,
    held_key: str | None = None,
    drop: np.ndarray | None = None,
) -> Catalog:
    """The catalog of dataset `root` filtered to `kind`. Errors name `where` (e.g. sources.vqa.path).

    With `heldout` > 0 the samples whose id hashes below it are left out (split "train") or
    are the only ones kept (split "heldout"). `held` (a bool per sample, from the image-grouped
    split, named by `held_key`) replaces the id hash. `drop` (a bool per sample: duplicates the
    spec's `dedup` leaves out) removes samples from the training split.
    """
    root = storage.as_root(root)
    manifest = load_manifest(root) if storage.is_remote(root) or root.is_dir() else None
    if manifest is None:
        why = "holds no manifest.json" if storage.is_remote(root) or root.exists() else "does not exist"
        raise ConfigError(f"{where}: {root} {why}; point it at a dataset folder written by vpit ingest")
    if not manifest.get("complete", True):
        raise ConfigError(
            f"{where}: {root} is only partly ingested ({len(manifest['shards'])} of "
            f"{manifest.get('shards_planned')} shards); re-run its vpit ingest command to finish it"
        )
    shards = manifest["shards"]
    counts = np.array([s["samples"] for s in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    picks = None
    mixed = kind is not None and any(0 < s["kinds"].get(kind, 0) < s["samples"] for s in shards)
    if heldout > 0 or mixed or drop is not None:
        columns = (("kind",) if mixed else ()) + (("id_hash",) if heldout > 0 and held is None else ())
        arrays = load_catalog_arrays(root, shards, columns)
        keep = np.ones(int(starts[-1]), dtype=bool)
        if mixed:
            keep &= np.asarray(arrays["kind"]) == KINDS.index(kind)
        elif kind is not None:  # every shard holds one kind: the manifest decides
            keep &= np.repeat([s["kinds"].get(kind, 0) > 0 for s in shards], counts)
        if heldout > 0:
            if held is None:
                held = np.asarray(arrays["id_hash"]) < np.uint64(heldout_threshold(heldout))
            keep &= held if split == "heldout" else ~held
        if drop is not None and split == "train":
            keep &= ~drop
        picks = np.flatnonzero(keep).astype(np.int64)
    elif kind is not None and any(s["kinds"].get(kind, 0) < s["samples"] for s in shards):
        picks = np.flatnonzero(np.repeat([s["kinds"].get(kind, 0) > 0 for s in shards], counts)).astype(np.int64)
    split_key = [kind] if heldout <= 0 else [kind, heldout, split]  # unchanged hashes for specs without a split
    if heldout > 0 and held_key is not None:
        split_key.append(held_key)
    if drop is not None and split == "train":
        split_key.append(["dedup", hashlib.sha256(np.packbits(drop).tobytes()).hexdigest()[:16]])
    h = hashlib.sha256(
        json.dumps([*split_key, [(s["name"], s["samples"], s["tar_sha256"]) for s in shards]]).encode()
    ).hexdigest()[:16]
    return Catalog(
        root=root,
        shard_names=tuple(s["name"] for s in shards),
        shard_starts=starts,
        picks=picks,
        fingerprint=h,
        kinds=dict(manifest.get("kinds", {})),
        shard_versions=tuple(s["tar_sha256"] for s in shards),
    )


class RecordReader:
    """Thread-safe random reads of sample JSON records from one dataset's shards.

    From a local dataset: one pread per record from the tar. From object storage: the shard's
    records parquet (a few percent of the tar: no images) comes whole through the node cache and
    is held while the shard is open; a shard written before records files existed falls back
    to its tar, fetched whole the same way.
    """

    def __init__(
        self,
        root: str | Path,
        shard_names: tuple[str, ...],
        open_shards: int = DEFAULT_OPEN_SHARDS,
        files: OpenFiles | None = None,
        versions: tuple[str, ...] = (),
    ):
        """`files`: an LRU shared with other readers (closed by its owner); default: one of our own.
        `versions`: each shard's tar_sha256 (`Catalog.shard_versions`), for the node cache."""
        self.root = storage.as_root(root)
        self.names = shard_names
        self.versions = versions
        self.own = files is None
        self.files = OpenFiles(capacity=open_shards) if files is None else files

    def _use(self, shard: int):
        return self.files.use((str(self.root), self.names[shard]), lambda key: self._open(shard))

    def _open(self, shard: int):
        name = self.names[shard]
        version = self.versions[shard] if self.versions else ""
        arrays = load_shard_arrays(self.root, name, version)
        if storage.is_remote(self.root):
            try:
                with storage.open_file(self.root, records_path(name), version) as f:
                    return None, (arrays, read_records_parquet(f))
            except FileNotFoundError:
                pass
        tar = storage.join(self.root, "shards", f"{name}.tar")
        return open_tar(tar, arrays.tar_bytes, storage.open_fd(self.root, f"shards/{name}.tar", version)), (
            arrays,
            None,
        )

    def record(self, shard: int, position: int) -> Record:
        with self._use(shard) as (fd, (arrays, records)):
            if records is not None:
                return json.loads(records[position])
            offset, size = arrays.json[position]
            return json.loads(os.pread(fd, int(size), int(offset)))

    def sample_id(self, shard: int, position: int) -> str:
        """The sample's id from the index alone (no tar read)."""
        with self._use(shard) as (_, (arrays, _)):
            return arrays.sample_id(position)

    def cost(self, shard: int, position: int, m: int) -> int:
        """Estimated tokens of a sample from the index alone: JSON bytes / 4 + images x (m + 2)."""
        with self._use(shard) as (_, (arrays, _)):
            images = int(arrays.image_start[position + 1] - arrays.image_start[position])
            return int(arrays.json[position, 1]) // 4 + images * (m + 2)

    def close(self) -> None:
        if self.own:
            self.files.close()

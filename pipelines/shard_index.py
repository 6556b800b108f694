"""The compact binary shard index, and the dataset-level arrays the planner reads.

Beside every `shards/shard-N.idx.json` (the readable index, written last: it marks the shard
done) the shard writer puts `shards/shard-N.idx.npz`: the same offsets as flat arrays, about
a quarter of the JSON's size and parsed in microseconds. Loaders and precompute read this one.

    json          int64 (n, 2)       [offset, size] of each sample's JSON member
    kind          uint8 (n,)         index into KINDS
    ids           bytes (n,)         sample ids, UTF-8 (fixed width: the longest id of the shard)
    id_hash       uint64 (n,)        the held-out hash of the sample id (`heldout_hash`)
    image_start   int64 (n + 1,)     sample p owns image rows image_start[p]:image_start[p+1]
    images        int64 (rows, 2)    [offset, size] of each image member, in record["images"] order
    image_sha     uint64 (rows,)     the first 8 bytes of each image's sha256 (0: unknown)
    image_dhash   uint64 (rows,)     each image's difference hash (`image_hash.dhash`; 0: unknown)
    tar_bytes     int64 ()           the tar's size: a loader refuses a tar of another size

At the end of an ingest the per-sample columns of every shard are concatenated into
`catalog/` (one .npy each: shard_starts, kind, id_hash, and per image image_start,
image_sha, image_dhash), so a planner with a `kind:` filter or a held-out split (by id or by
image) reads a few memory-mappable arrays instead of 20k indexes.

npz and npy, not a format of our own: numpy reads them with `allow_pickle=False`, so a
hostile file cannot run code, and other tools can open them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from vpit import storage
from vpit.common import save_json_atomic
from vpit.errors import InputError
from vpit.pipelines.sample import KINDS
from vpit.records import ShardEntry, ShardIndex

__all__ = [
    "ALL_COLUMNS",
    "CATALOG_DIR",
    "ShardArrays",
    "build_catalog_arrays",
    "catalog_is_current",
    "heldout_hash",
    "index_arrays",
    "load_catalog_arrays",
    "load_shard_arrays",
    "write_index_arrays",
]

CATALOG_DIR = "catalog"
_IMG = re.compile(r"^img(\d+)\.")


def heldout_hash(sample_id: str) -> int:
    """A sample's position in [0, 2^64) for the id-hash held-out split: fixed by the id alone."""
    return int.from_bytes(hashlib.sha256(f"vpit-heldout:{sample_id}".encode()).digest()[:8], "big")


@dataclasses.dataclass(frozen=True, slots=True)
class ShardArrays:
    """One shard's binary index (see the module docstring)."""

    json: np.ndarray
    kind: np.ndarray
    ids: np.ndarray
    id_hash: np.ndarray
    image_start: np.ndarray
    images: np.ndarray
    image_sha: np.ndarray
    image_dhash: np.ndarray
    tar_bytes: int

    def __len__(self) -> int:
        return len(self.kind)

    def sample_id(self, position: int) -> str:
        return self.ids[position].decode("utf-8")

    def image_spans(self, position: int) -> np.ndarray:
        return self.images[self.image_start[position] : self.image_start[position + 1]]


def index_arrays(
    idx: ShardIndex, image_sha: list[list[str]] | None = None, image_dhash: list[int] | None = None
) -> ShardArrays:
    """The binary index of a JSON index. `image_sha` (per sample, the records' image sha256s)
    and `image_dhash` (per image row) fill those columns; without them (an index written before
    binary indexes) they stay 0."""
    samples = idx["samples"]
    n = len(samples)
    spans, starts = [], [0]
    for entry in samples:
        imgs = sorted((int(m.group(1)), span) for k, span in entry["members"].items() if (m := _IMG.match(k)))
        spans += [span for _, span in imgs]
        starts.append(len(spans))
    sha = np.zeros(len(spans), dtype=np.uint64)
    if image_sha is not None:
        flat = [h for per in image_sha for h in per]
        sha[:] = [int(h[:16], 16) for h in flat]
    code = {k: i for i, k in enumerate(KINDS)}
    return ShardArrays(
        json=np.array([e["members"]["json"] for e in samples], dtype=np.int64).reshape(n, 2),
        kind=np.array([code[e["kind"]] for e in samples], dtype=np.uint8),
        ids=np.array([e["id"].encode("utf-8") for e in samples], dtype=bytes),
        id_hash=np.array([heldout_hash(e["id"]) for e in samples], dtype=np.uint64),
        image_start=np.array(starts, dtype=np.int64),
        images=np.array(spans, dtype=np.int64).reshape(len(spans), 2),
        image_sha=sha,
        image_dhash=np.array(image_dhash if image_dhash is not None else [0] * len(spans), dtype=np.uint64),
        tar_bytes=int(idx["tar_bytes"]),
    )


def _npz_path(root: Path, name: str) -> Path:
    return Path(root) / "shards" / f"{name}.idx.npz"


def write_index_arrays(root: Path, name: str, arrays: ShardArrays) -> None:
    path = _npz_path(root, name)
    tmp = path.with_suffix(".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **{f.name: np.asarray(getattr(arrays, f.name)) for f in dataclasses.fields(ShardArrays)})
    os.replace(tmp, path)


def load_shard_arrays(root: str | Path, name: str, version: str = "") -> ShardArrays:
    """A shard's binary index; from its JSON index when the binary one is absent (older datasets).
    A remote dataset's index comes through the node cache (`version`: the shard's tar_sha256)."""
    path = f"shards/{name}.idx.npz"
    try:
        with storage.open_file(root, path, version) as fh, np.load(fh, allow_pickle=False) as z:
            fields = {f.name: z[f.name] for f in dataclasses.fields(ShardArrays) if f.name in z.files}
        missing = {f.name for f in dataclasses.fields(ShardArrays)} - set(fields) - set(_ADDED)
        if missing:
            raise ValueError(f"it lacks {', '.join(sorted(missing))}")
        for name in _ADDED:  # an index written before the column existed: unknown (0) per image
            fields.setdefault(name, np.zeros(len(fields["images"]), dtype=np.uint64))
    except FileNotFoundError:
        json_path = storage.join(root, "shards", f"{name}.idx.json")
        try:
            return index_arrays(json.loads(storage.read_bytes(root, f"shards/{name}.idx.json").decode("utf-8")))
        except FileNotFoundError:
            raise InputError(
                f"{json_path} is missing: the shard's index is gone; re-run the ingest command that wrote "
                f"{root} (it redoes shards without an index)"
            ) from None
    except (ValueError, KeyError, OSError) as e:
        if storage.is_remote(root) and isinstance(e, OSError):
            raise  # a network or store error, not a damaged file: nothing to delete
        raise InputError(
            f"{storage.join(root, path)}: not a readable shard index ({e}); delete it and re-run the ingest"
        ) from None
    fields["tar_bytes"] = int(fields["tar_bytes"])
    return ShardArrays(**fields)


_ADDED = ("image_dhash",)
_COLUMNS = ("kind", "id_hash")
_IMAGE_COLUMNS = ("image_sha", "image_dhash")
ALL_COLUMNS = (*_COLUMNS, "image_start", *_IMAGE_COLUMNS)


def _shards_digest(shards: list[ShardEntry]) -> str:
    """What the catalog was built from: the shards' names and checksums, in order."""
    return hashlib.sha256(json.dumps([(s["name"], s["tar_sha256"]) for s in shards]).encode()).hexdigest()


def _concatenate(root: str | Path, shards: list[ShardEntry], columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The shards' columns end to end: per-sample ones (kind, id_hash), per-image ones
    (image_sha, image_dhash), image_start renumbered to global image rows, and shard_starts."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns if c != "image_start"}
    starts, image_start, rows = [0], [np.zeros(1, np.int64)], 0
    for entry in shards:
        arrays = load_shard_arrays(root, entry["name"], entry.get("tar_sha256", ""))
        for c in parts:
            parts[c].append(np.asarray(getattr(arrays, c)))
        image_start.append(rows + np.asarray(arrays.image_start[1:], dtype=np.int64))
        rows += int(arrays.image_start[-1])
        starts.append(starts[-1] + len(arrays))
    out = {"shard_starts": np.array(starts, dtype=np.int64)}
    for c, arrs in parts.items():
        out[c] = np.concatenate(arrs).astype(np.uint8 if c == "kind" else np.uint64) if arrs else np.zeros(0, np.uint64)
    if "image_start" in columns:
        out["image_start"] = np.concatenate(image_start).astype(np.int64)
    return out


def build_catalog_arrays(root: str | Path, shards: list[ShardEntry], read_from: str | None = None) -> None:
    """Concatenate the shards' columns into ROOT/catalog/*.npy (one pass, at ingest end), reading
    the shard indexes from `read_from` (a remote dataset's URL) when given."""
    root = Path(root)
    out = root / CATALOG_DIR
    out.mkdir(exist_ok=True)
    (out / "catalog.json").unlink(missing_ok=True)  # written last: its presence marks the arrays whole
    for c, arr in _concatenate(read_from or root, shards, ALL_COLUMNS).items():
        tmp = out / f"{c}.tmp.npy"
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, out / f"{c}.npy")
    save_json_atomic(out / "catalog.json", {"kinds": list(KINDS), "shards": _shards_digest(shards)})


def catalog_is_current(root: str | Path, shards: list[ShardEntry]) -> bool:
    """Whether ROOT/catalog holds whole arrays built from exactly these shards."""
    try:
        meta = json.loads(storage.read_bytes(storage.as_root(root), f"{CATALOG_DIR}/catalog.json"))
    except (FileNotFoundError, ValueError):
        return False
    return meta == {"kinds": list(KINDS), "shards": _shards_digest(shards)}


def load_catalog_arrays(
    root: str | Path, shards: list[ShardEntry], columns: tuple[str, ...], write: bool = False
) -> dict[str, np.ndarray]:
    """Memory-mapped catalog columns (plus shard_starts). When they are absent or out of date (a
    dataset ingested before catalogs existed) they are built from the shard indexes: written to
    ROOT/catalog with `write` (what ingest does), else in memory only (planning writes nothing;
    re-running the dataset's ingest command writes them once)."""
    root = storage.as_root(root)
    wanted = ("shard_starts", *columns)
    meta = {"kinds": list(KINDS), "shards": _shards_digest(shards)}

    def load() -> dict[str, np.ndarray] | None:
        try:
            if json.loads(storage.read_bytes(root, f"{CATALOG_DIR}/catalog.json")) != meta:
                return None
            if not storage.is_remote(root):
                return {c: np.load(root / CATALOG_DIR / f"{c}.npy", allow_pickle=False, mmap_mode="r") for c in wanted}
            out = {}
            for c in wanted:  # from the node cache, read whole (a memory map needs a path the cache could evict)
                with storage.open_file(root, f"{CATALOG_DIR}/{c}.npy", meta["shards"]) as f:
                    out[c] = np.load(f, allow_pickle=False)
            return out
        except (FileNotFoundError, ValueError):
            return None

    arrays = load()
    if arrays is None:
        if not write:
            return _concatenate(root, shards, columns)
        build_catalog_arrays(root, shards)
        arrays = load()
    return arrays

"""`vpit dedup DATASET...`: duplicate images within and across datasets.

Exact duplicates share a sha256 (its first 8 bytes are in every shard index); near duplicates
are re-encoded or resized copies, found by difference hash (`image_hash`). The report gives,
for each: the images that have a copy, the copies that could go (every image of a group but
one) and the bytes they hold, how many groups span datasets, and the largest groups with the
samples that use them. It reads the shard indexes only, never a tar.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vpit.errors import ConfigError, InputError
from vpit.pipelines.image_hash import MAX_DISTANCE, NEAR_DISTANCE, group_labels
from vpit.pipelines.shard_index import load_shard_arrays
from vpit.pipelines.shards import load_manifest

__all__ = ["DedupConfig", "find_duplicates", "format_dedup"]


@dataclasses.dataclass
class DedupConfig:
    datasets: tuple[str, ...] = dataclasses.field(default=(), metadata={"path": (), "or_name": False})
    """Dataset folders to compare, within each and across them."""
    top: int = 5
    """Largest duplicate groups to show, with the samples that use them."""
    near_distance: int = NEAR_DISTANCE
    """Near duplicates: difference hashes within this many bits (of 56)."""

    def __post_init__(self):
        if not self.datasets:
            raise ConfigError("datasets: give at least one dataset folder, e.g. vpit dedup datasets/a datasets/b")
        if not 0 <= self.near_distance <= MAX_DISTANCE:
            raise ConfigError(f"near_distance: expected 0..{MAX_DISTANCE} bits, got {self.near_distance}")


def _images(root: Path) -> dict[str, Any]:
    """Every image row of a dataset: sha, dhash, bytes, and where it is (shard, sample position)."""
    manifest = load_manifest(root) if root.is_dir() else None
    if manifest is None:
        raise InputError(f"{root} holds no manifest.json: is it a vpit dataset?")
    sha, near, size, shard, pos = [], [], [], [], []
    names = [e["name"] for e in manifest["shards"]]
    for s, name in enumerate(tqdm(names, desc=f"dedup {root.name}", unit="shard", leave=False)):
        a = load_shard_arrays(root, name)
        sha.append(a.image_sha)
        near.append(a.image_dhash)
        size.append(a.images[:, 1] if len(a.images) else np.zeros(0, np.int64))
        pos.append(np.repeat(np.arange(len(a)), np.diff(a.image_start)))
        shard.append(np.full(len(a.images), s, dtype=np.int64))

    def cat(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return {
        "sha": cat(sha, np.uint64),
        "near": cat(near, np.uint64),
        "bytes": cat(size, np.int64),
        "shard": cat(shard, np.int64),
        "pos": cat(pos, np.int64),
        "root": root,
        "names": names,
    }


def _summary(labels: np.ndarray, dataset: np.ndarray, nbytes: np.ndarray, sample_id, top: int) -> dict:
    """Counts for one grouping, vectorised; sample ids are read only for the `top` groups shown."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    dup = counts[inverse] > 1
    first = np.zeros(len(labels), dtype=bool)
    first[np.unique(inverse, return_index=True)[1]] = True  # the one image of each group that stays
    pairs = np.unique(np.stack([inverse[dup], dataset[dup]]), axis=1)  # (group, dataset) present
    across = int((np.bincount(pairs[0]) > 1).sum()) if pairs.size else 0
    groups = []
    for g in np.argsort(-counts, kind="stable")[:top]:
        if counts[g] < 2:
            break
        members = np.flatnonzero(inverse == g)
        groups.append(
            {
                "images": int(counts[g]),
                "datasets": sorted({int(d) for d in dataset[members]}),
                "samples": [sample_id(int(i)) for i in members[:4]],
            }
        )
    return {
        "images_with_a_copy": int(dup.sum()),
        "groups": int((counts > 1).sum()),
        "removable": int((dup & ~first).sum()),
        "bytes_saved": int(nbytes[dup & ~first].sum()),
        "groups_across_datasets": across,
        "top": groups,
    }


def find_duplicates(cfg: DedupConfig) -> dict[str, Any]:
    """{"images", "bytes", "datasets", "unhashed", "exact": summary, "near": summary}."""
    roots = [Path(d) for d in cfg.datasets]
    parts = [_images(r) for r in roots]
    names = [r.name if [x.name for x in roots].count(r.name) == 1 else str(r) for r in roots]
    dataset = np.concatenate([np.full(len(p["sha"]), i, dtype=np.int64) for i, p in enumerate(parts)])
    sha = np.concatenate([p["sha"] for p in parts])
    near = np.concatenate([p["near"] for p in parts])
    nbytes = np.concatenate([p["bytes"] for p in parts])
    offsets = np.cumsum([0] + [len(p["sha"]) for p in parts])

    def sample_id(row: int) -> str:
        d = int(np.searchsorted(offsets, row, side="right") - 1)
        p, k = parts[d], row - int(offsets[d])
        return load_shard_arrays(p["root"], p["names"][int(p["shard"][k])]).sample_id(int(p["pos"][k]))

    def summary(labels: np.ndarray) -> dict:
        out = _summary(labels, dataset, nbytes, sample_id, cfg.top)
        for g in out["top"]:
            g["datasets"] = [names[d] for d in g["datasets"]]
        return out

    return {
        "datasets": names,
        "images": len(sha),
        "bytes": int(nbytes.sum()),
        "unhashed": int((sha == 0).sum()),
        "no_near_hash": int((near == 0).sum()),
        "exact": summary(group_labels(sha)),
        "near": summary(group_labels(sha, near, max_distance=cfg.near_distance)),
    }


def format_dedup(r: dict[str, Any], near_distance: int) -> str:
    lines = [f"images    {r['images']:,} in {len(r['datasets'])} dataset(s), {r['bytes'] / 2**20:,.1f} MiB"]
    for what, title in (("exact", "exact (same sha256)"), ("near", f"near (within {near_distance} bits)")):
        s = r[what]
        lines.append(
            f"{title}: {s['images_with_a_copy']:,} images in {s['groups']:,} groups "
            f"({s['groups_across_datasets']:,} across datasets); {s['removable']:,} copies removable, "
            f"{s['bytes_saved'] / 2**20:,.2f} MiB saved"
        )
        for g in s["top"]:
            more = " ..." if g["images"] > 4 else ""
            lines.append(f"  {g['images']:>5} x  {', '.join(g['samples'])}{more}  [{', '.join(g['datasets'])}]")
    if r["unhashed"] or r["no_near_hash"]:
        lines.append(
            f"note      {r['unhashed']:,} images without a sha256 and {r['no_near_hash']:,} without a near hash in "
            "their index (shards written by an older vpit): they are compared only by what their index holds"
        )
    return "\n".join(lines)

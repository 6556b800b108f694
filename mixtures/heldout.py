"""The held-out split: samples a mixture never trains on, for evaluation.

By id (`heldout: F`, the form of older specs): a sample is held out when a hash of its id
falls below F (`catalog.is_heldout`). The split depends on the id alone, so it is the same
for every cell of a grid, every seed and every world size.

By image (`heldout: {fraction: F}`, the default of the mapping form): the id hash picks the
seed samples, then every sample of any dataset in the mixture that shares an image with a
held-out sample is held out too, repeated until no training sample shares an image with a
held-out one (a record with two images can join two groups). Images are the same when their
sha256 is (the first 8 bytes, kept in the shard index), and, with `near: true`, when their
difference hashes are within a few bits (`pipelines.image_hash`). Still a function of the
datasets alone: every cell and seed of a grid that reads the same datasets holds out the same.

The split also counts what the id hash alone would have leaked: training samples that share
an image with a held-out one. `vpit mix plan` prints both per source.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from vpit import storage
from vpit.errors import ConfigError
from vpit.mixtures.catalog import RecordReader, build_catalog, heldout_threshold
from vpit.mixtures.spec import MixtureSpec
from vpit.pipelines.image_hash import group_labels
from vpit.pipelines.shard_index import load_catalog_arrays
from vpit.pipelines.shards import load_manifest
from vpit.records import StreamItem

__all__ = ["ImageSplit", "duplicate_masks", "heldout_items", "image_split", "mixture_images", "split_masks"]


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """Held-out masks grouped by image, per dataset folder, and what grouping changed."""

    masks: dict[Path, np.ndarray]
    """Per dataset root: bool over its samples in dataset order, True = held out."""
    report: tuple[dict, ...]
    """Per source (after `for_sources`; per dataset before): samples, by_id (the id hash's seed),
    moved (added by grouping), leak_by_id (training samples that would share an image with a
    held-out one under the id hash alone), leak_by_image (the same under this split: 0),
    unknown_images (images without a sha256, or with `near` without a difference hash, in the index:
    they join no group)."""
    columns: dict[Path, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    """Per dataset root: the per-sample seed, leak, after and kind arrays the report is cut from."""

    def digest(self, root: Path) -> str:
        return hashlib.sha256(np.packbits(self.masks[root]).tobytes()).hexdigest()[:16]

    def for_sources(self, spec: MixtureSpec) -> tuple[dict, ...]:
        """The report per source of `spec`: its dataset's counts within its kind filter."""
        from vpit.pipelines.sample import KINDS

        rows = []
        by_root = {r["dataset"]: r for r in self.report}
        for src in spec.sources:
            root = storage.as_root(src.path)
            c, held = self.columns[root], self.masks[root]
            mine = np.ones(len(held), bool) if src.kind is None else c["kind"] == KINDS.index(src.kind)
            rows.append(
                {
                    "source": src.name,
                    "dataset": str(root),
                    "samples": int(mine.sum()),
                    "by_id": int((c["seed"] & mine).sum()),
                    "moved": int((held & ~c["seed"] & mine).sum()),
                    "leak_by_id": int((c["leak"] & mine).sum()),
                    "leak_by_image": int((c["after"] & mine).sum()),
                    "unknown_images": by_root[str(root)]["unknown_images"],
                }
            )
        return tuple(rows)

    def table(self, by: str) -> list[str]:
        """What `vpit mix plan` prints: per source, for the split the spec uses."""
        if by == "image":
            lines = ["held out by image (every sample that shares an image with a held-out one):"]
        else:
            lines = ["held out by id hash (set heldout: {fraction: F} to hold out by image):"]
        for r in self.report:
            unknown = (
                f"; {r['unknown_images']:,} images without a hash in the index (written before vpit hashed "
                "images: re-ingest those shards to group them)"
                if r["unknown_images"]
                else ""
            )
            name = r.get("source", r["dataset"])
            if by == "image":
                lines.append(
                    f"  {name}: {r['by_id'] + r['moved']:,} of {r['samples']:,} held out "
                    f"({r['by_id']:,} by id hash + {r['moved']:,} sharing their images); training samples "
                    f"sharing a held-out image: {r['leak_by_image']:,} (the id hash alone: {r['leak_by_id']:,})"
                    f"{unknown}"
                )
            else:
                lines.append(
                    f"  {name}: {r['by_id']:,} of {r['samples']:,} held out; LEAK: {r['leak_by_id']:,} "
                    f"training samples share an image with a held-out one{unknown}"
                )
        return lines


@dataclasses.dataclass(frozen=True)
class MixtureImages:
    """Every sample and image of the datasets a spec reads, end to end in spec order."""

    roots: list[Path]
    sizes: list[int]
    """Samples per dataset."""
    id_hash: np.ndarray
    kind: np.ndarray
    owner: np.ndarray
    """The sample (global number) each image row belongs to."""
    sha: np.ndarray
    near: np.ndarray

    def labels(self, near: bool) -> np.ndarray:
        """A group label per image: the same picture (sha256, and with `near` its close copies)."""
        return group_labels(self.sha, self.near if near else None)


_CACHE: dict[tuple, object] = {}


def mixture_images(spec: MixtureSpec) -> MixtureImages:
    roots = list(dict.fromkeys(storage.as_root(s.path) for s in spec.sources))
    manifests = []
    for root in roots:
        manifest = load_manifest(root) if storage.is_remote(root) or root.is_dir() else None
        if manifest is None:  # build_catalog names the source and the fix
            raise ConfigError(f"{root} holds no manifest.json; point the source at a vpit dataset")
        manifests.append(manifest)
    key = ("images", tuple(map(str, roots)), tuple(tuple(s["tar_sha256"] for s in m["shards"]) for m in manifests))
    if key in _CACHE:
        return _CACHE[key]
    columns = ("id_hash", "kind", "image_start", "image_sha", "image_dhash")
    arrays = [load_catalog_arrays(root, m["shards"], columns) for root, m in zip(roots, manifests, strict=True)]
    id_hash = np.concatenate([np.asarray(a["id_hash"], dtype=np.uint64) for a in arrays])
    per_sample = np.concatenate([np.diff(np.asarray(a["image_start"])) for a in arrays])
    images = MixtureImages(
        roots=roots,
        sizes=[len(a["id_hash"]) for a in arrays],
        id_hash=id_hash,
        kind=np.concatenate([np.asarray(a["kind"], dtype=np.uint8) for a in arrays]),
        owner=np.repeat(np.arange(len(id_hash)), per_sample),
        sha=np.concatenate([np.asarray(a["image_sha"], dtype=np.uint64) for a in arrays]),
        near=np.concatenate([np.asarray(a["image_dhash"], dtype=np.uint64) for a in arrays]),
    )
    _CACHE[key] = images
    return images


def image_split(spec: MixtureSpec) -> ImageSplit:
    """The image-grouped held-out split over every dataset the spec's sources read."""
    m = mixture_images(spec)
    key = ("split", tuple(map(str, m.roots)), id(m), spec.heldout, spec.heldout_near)
    if key in _CACHE:
        return _CACHE[key]
    roots, sizes, id_hash, owner, sha = m.roots, m.sizes, m.id_hash, m.owner, m.sha
    labels = m.labels(spec.heldout_near)

    def sharing(held: np.ndarray) -> np.ndarray:
        """Samples with an image in the same group as an image of a `held` sample."""
        groups = np.unique(labels[held[owner]])
        out = np.zeros(len(held), dtype=bool)
        out[owner[np.isin(labels, groups)]] = True
        return out

    seed = id_hash < np.uint64(heldout_threshold(spec.heldout))
    held = seed.copy()
    while True:  # a sample with several images can bring in another group: to the fixed point
        grown = held | sharing(held)
        if np.array_equal(grown, held):
            break
        held = grown
    leak = sharing(seed) & ~seed
    after = sharing(held) & ~held  # what the grouped split still leaks: none, by construction
    masks, columns, report, start = {}, {}, [], 0
    img_start = 0
    for root, n in zip(roots, sizes, strict=True):
        sl = slice(start, start + n)
        rows = int(((owner >= start) & (owner < start + n)).sum())
        masks[root] = held[sl]
        columns[root] = {"seed": seed[sl], "leak": leak[sl], "after": after[sl], "kind": m.kind[sl]}
        report.append(
            {
                "dataset": str(root),
                "samples": n,
                "by_id": int(seed[sl].sum()),
                "moved": int((held[sl] & ~seed[sl]).sum()),
                "leak_by_id": int(leak[sl].sum()),
                "leak_by_image": int(after[sl].sum()),
                # images that join no group: no sha256 in the index (or, with near, no difference hash:
                # shards written before vpit hashed them, which near grouping cannot see)
                "unknown_images": int(
                    (
                        (sha[img_start : img_start + rows] == 0)
                        | ((m.near[img_start : img_start + rows] == 0) & spec.heldout_near)
                    ).sum()
                ),
            }
        )
        start, img_start = start + n, img_start + rows
    split = ImageSplit(masks=masks, report=tuple(report), columns=columns)
    _CACHE[key] = split
    return split


def duplicate_masks(spec: MixtureSpec, held: dict[Path, np.ndarray]) -> tuple[dict[Path, np.ndarray], dict]:
    """With `dedup: exact|near`: the generation samples to leave out of training because their
    target image is a copy of an earlier training generation sample's (sources in spec order,
    samples in dataset order); per dataset root a bool mask, and the count dropped per root.
    Only generation samples: a second question about an image is a new sample, a second
    caption pair on the same picture is a repeat of its target."""
    from vpit.pipelines.sample import KINDS

    m = mixture_images(spec)
    labels = m.labels(spec.dedup == "near")
    train = np.concatenate([~held[r] if r in held else np.ones(n, bool) for r, n in zip(m.roots, m.sizes, strict=True)])
    drawable = np.zeros(len(train), dtype=bool)  # a sample some source of the spec can draw (its kind filter)
    start = 0
    for root, n in zip(m.roots, m.sizes, strict=True):
        for src in spec.sources:
            if storage.as_root(src.path) == root:
                kinds = m.kind[start : start + n]
                drawable[start : start + n] |= True if src.kind is None else kinds == KINDS.index(src.kind)
        start += n
    gen = (m.kind == KINDS.index("generation")) & train & drawable
    rows = np.flatnonzero(gen[m.owner] & ((m.sha != 0) | (m.near != 0)))  # images of training generation samples
    _, first = np.unique(labels[rows], return_index=True)  # the first image of each picture, in order
    keeps = np.zeros(len(gen), dtype=bool)
    keeps[m.owner[rows[first]]] = True  # a sample is kept when one of its images is a first copy
    drop = gen & ~keeps & np.isin(np.arange(len(gen)), m.owner[rows])
    masks, counts, start = {}, {}, 0
    for root, n in zip(m.roots, m.sizes, strict=True):
        masks[root] = drop[start : start + n]
        counts[str(root)] = int(masks[root].sum())
        start += n
    return masks, counts


def split_masks(spec: MixtureSpec) -> tuple[ImageSplit | None, dict[Path, np.ndarray]]:
    """(the image split, for its report, or None without a held-out split; the held mask per
    dataset root when the spec holds out by image, else {}: the id hash decides)."""
    if spec.heldout <= 0:
        return None, {}
    split = image_split(spec)
    return split, (split.masks if spec.heldout_by == "image" else {})


def heldout_items(spec: MixtureSpec, max_per_source: int | None = None) -> list[StreamItem]:
    """Held-out items of every source, in source then shard order, shaped like stream items
    (`record`, `tokens` when the spec names a cache). At most `max_per_source` per source,
    taken evenly across the source so every shard is represented."""
    if spec.heldout <= 0:
        raise ConfigError(
            f"{spec.origin}: heldout is 0, so there is nothing to evaluate on; set e.g. heldout: 0.02 "
            "in the mixture spec (and retrain: the split changes which samples train)"
        )
    items: list[StreamItem] = []
    split, masks = split_masks(spec)
    for s in spec.sources:
        root = storage.as_root(s.path)
        cat = build_catalog(
            s.path,
            s.kind,
            f"sources.{s.name}.path",
            heldout=spec.heldout,
            split="heldout",
            held=masks.get(root),
            held_key=split.digest(root) if split else None,
        )
        n = cat.size if max_per_source is None else min(cat.size, max_per_source)
        picks = np.unique(np.linspace(0, cat.size - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)
        shards, positions = cat.locate(picks)
        reader = RecordReader(cat.root, cat.shard_names, versions=cat.shard_versions)
        cache = None
        if spec.cache:
            from vpit.pipelines.token_cache import TokenCache

            cache = TokenCache(cat.root, spec.cache, shard_names=cat.shard_names, versions=cat.shard_versions)
        try:
            for shard, pos in zip(shards.tolist(), positions.tolist(), strict=True):
                record = reader.record(shard, pos)
                item = {"index": -1, "id": record["id"], "source": s.name, "group": s.group, "record": record}
                if cache is not None:
                    item["tokens"] = np.asarray(cache.tokens(shard, pos), dtype=np.float32)
                items.append(item)
        finally:
            reader.close()
    return items

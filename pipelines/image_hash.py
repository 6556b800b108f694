"""Image identity: exact (the first 8 bytes of the sha256 the record stores) and near (a
difference hash of the pixels), and grouping of images that are the same picture.

The difference hash (dHash) of an image is the sign of the horizontal brightness gradient on a
9x7 grey thumbnail: 56 bits that survive re-encoding, resizing and small colour changes. It is
written into the shard index at ingest (`image_dhash`), with bit 63 set to mark a hash as known
(0: not computed). Measured on photo-like images: a JPEG re-encode (quality 60-85) with a
resize lands within 2 bits of the original 85-90% of the time and within 4 bits 98%; distinct
pictures were 9 or more bits apart.

Our own 20 lines rather than the `imagehash` package: the same algorithm on PIL, without the
scipy and PyWavelets it would add to every install.

Grouping near hashes: identical hashes are joined first, then the distinct ones are compared.
Two hashes within `max_distance` bits agree exactly on at least one of `max_distance + 1`
bands of the 56 bits (pigeonhole), so candidates are the hashes sharing a band value, and
every candidate pair is compared: the search is exact. Its cost is about N^2 / 2^(56 / bands)
comparisons per band for N distinct hashes; a search that would pass `MAX_COMPARISONS` is
refused with the figure rather than run for hours (lower the distance, or use exact).
"""

from __future__ import annotations

import io

import numpy as np

from vpit.errors import ConfigError

__all__ = ["KNOWN", "MAX_COMPARISONS", "NEAR_DISTANCE", "dhash", "group_labels"]

KNOWN = np.uint64(1 << 63)
NEAR_DISTANCE = 2
"""Bits (of 56) within which two images count as the same picture: wide bands (19 bits), so the
exact search scales to tens of millions of distinct hashes."""
MAX_DISTANCE = 6
MAX_COMPARISONS = 4 * 10**9
_W, _H = 9, 7
_CHUNK = 1 << 22  # candidate pairs compared per numpy step


def dhash(data: bytes) -> int:
    """The 56-bit difference hash of an encoded image, with the KNOWN bit; 0 if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (_W * 4, _H * 4))  # JPEG: decode at a reduced scale, far faster
            img.seek(0)  # animated: the first frame, as the encoder reads it
            grey = np.asarray(img.convert("L").resize((_W, _H), Image.Resampling.BOX), dtype=np.int16)
    except Exception:  # noqa: BLE001 - any unreadable image simply has no near hash
        return 0
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()  # 7 rows x 8 gradients
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little") | (1 << 63)


def _equal_edges(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, first image with the same key) for every valid image, vectorised."""
    idx = np.flatnonzero(valid)
    order = idx[np.lexsort((idx, keys[idx]))]  # by key, then index: a run starts at its smallest
    k = keys[order]
    starts = np.r_[True, k[1:] != k[:-1]] if len(k) else np.zeros(0, bool)
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))] if len(k) else order
    return order, first


def _roots(parent: np.ndarray) -> np.ndarray:
    while True:  # pointer jumping: every image points at its component's root
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Join the components of a[i] and b[i] for every i; roots are the smallest index (vectorised)."""
    while True:
        parent = _roots(parent)
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        np.minimum.at(parent, np.maximum(ra[diff], rb[diff]), np.minimum(ra[diff], rb[diff]))


def group_labels(exact: np.ndarray, near: np.ndarray | None = None, max_distance: int = NEAR_DISTANCE) -> np.ndarray:
    """A label per image (the smallest image index of its group) such that images with the same
    exact key (non-zero), or (with `near`) known hashes within `max_distance` bits, share it
    (connected components). Images with an unknown key get a label of their own."""
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise ConfigError(f"near distance: expected 0..{MAX_DISTANCE} bits, got {max_distance}")
    exact = np.asarray(exact, dtype=np.uint64)
    parent = _union(np.arange(len(exact), dtype=np.int64), *_equal_edges(exact, exact != 0))  # the same bytes
    if near is None:
        return parent
    near = np.asarray(near, dtype=np.uint64)
    known = (near & KNOWN) != 0
    parent = _union(parent, *_equal_edges(near, known))  # the same hash
    if max_distance == 0:
        return parent
    # Distinct known hashes, one representative each (the smallest image index with it).
    values, first = np.unique(near[known], return_index=True)
    reps = np.flatnonzero(known)[first]
    bits = values & ~KNOWN
    bands = max_distance + 1
    width = -(-56 // bands)
    pairs_a, pairs_b = [], []
    buckets = []
    for b in range(bands):
        band = (bits >> np.uint64(b * width)) & np.uint64((1 << min(width, 56 - b * width)) - 1)
        order = np.argsort(band, kind="stable")
        keys = band[order]
        cuts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
        sizes = np.diff(cuts)
        buckets.append((order, cuts, sizes))
    comparisons = sum(int((s * (s - 1) // 2).sum()) for _, _, s in buckets)
    if comparisons > MAX_COMPARISONS:
        raise ConfigError(
            f"near duplicates within {max_distance} bits over {len(values):,} distinct hashes would take "
            f"{comparisons:,} comparisons; lower the distance (each bit less widens the bands) or group by "
            "exact sha256 only"
        )
    for order, cuts, sizes in buckets:
        for size in np.unique(sizes[sizes > 1]):  # buckets of one size at a time, vectorised
            starts = cuts[:-1][sizes == size]
            i, j = np.triu_indices(int(size), 1)
            for lo in range(0, len(starts), max(1, _CHUNK // len(i))):
                s = starts[lo : lo + max(1, _CHUNK // len(i))][:, None]
                a, c = order[s + i].ravel(), order[s + j].ravel()
                close = np.bitwise_count(bits[a] ^ bits[c]) <= max_distance
                pairs_a.append(reps[a[close]])
                pairs_b.append(reps[c[close]])
    if pairs_a:
        parent = _union(parent, np.concatenate(pairs_a), np.concatenate(pairs_b))
    return parent

"""Image identity: exact (the first 8 bytes of the sha256 the record stores) and near (a
difference hash of the pixels), and grouping of images that are the same picture.

The difference hash (dHash) of an image is the sign of the horizontal brightness gradient on a
9x7 grey thumbnail: 56 bits that survive re-encoding, resizing and small colour changes, so
two copies of one picture land within a few bits of each other. It is written into the shard
index at ingest (`image_dhash`), with bit 63 set to mark a hash as known (0: not computed).

Our own 20 lines rather than the `imagehash` package: the same algorithm on PIL, without the
scipy and PyWavelets it would add to every install.

Grouping near hashes: two hashes within `max_distance` bits agree exactly on at least one of
`max_distance + 1` bands of the 56 bits (pigeonhole), so candidates are found by sorting on
each band, and only candidates are compared: no all-pairs comparison.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["KNOWN", "NEAR_DISTANCE", "dhash", "group_labels"]

KNOWN = np.uint64(1 << 63)
NEAR_DISTANCE = 4
"""Bits (of 56) within which two images count as the same picture (re-encoded or resized)."""
_W, _H = 9, 7
_BUCKET_LIMIT = 512  # a band value shared by more images than this (flat images) is compared to its first only


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


def group_labels(exact: np.ndarray, near: np.ndarray | None = None, max_distance: int = NEAR_DISTANCE) -> np.ndarray:
    """A label per image such that images with the same exact key (non-zero), or (with `near`)
    known hashes within `max_distance` bits, share a label (connected components). Images with
    an unknown key get a label of their own."""
    n = len(exact)
    parent = np.arange(n, dtype=np.int64)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union_pairs(a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)

    def runs(keys: np.ndarray, valid: np.ndarray):
        """(members) of each run of equal keys among the valid images, in sorted order."""
        idx = np.flatnonzero(valid)
        if idx.size < 2:
            return
        order = idx[np.argsort(keys[idx], kind="stable")]
        k = keys[order]
        cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
        for run in np.split(order, cuts):
            if run.size > 1:
                yield run

    exact = np.asarray(exact, dtype=np.uint64)
    for run in runs(exact, exact != 0):  # the same bytes
        union_pairs(np.full(run.size - 1, run[0]), run[1:])
    if near is not None:
        near = np.asarray(near, dtype=np.uint64)
        known = (near & KNOWN) != 0
        bits = near & ~KNOWN
        bands = max_distance + 1
        width = -(-56 // bands)
        for b in range(bands):
            band = (bits >> np.uint64(b * width)) & np.uint64((1 << width) - 1)
            for run in runs(band, known):
                if run.size > _BUCKET_LIMIT:
                    a, c = np.full(run.size - 1, run[0]), run[1:]
                else:
                    a, c = np.triu_indices(run.size, 1)
                    a, c = run[a], run[c]
                close = np.bitwise_count(bits[a] ^ bits[c]) <= max_distance
                union_pairs(a[close], c[close])
    while True:  # every image points at its component's smallest member (pointer jumping)
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up

"""What the diffusion decoder learns from: (image, visual tokens) pairs of a dataset.

Every image of every sample is a pair: its bytes from the shards (one seek through the
shard index) and its row in the token cache (one memory-mapped read). Inputs and targets
alike: the decoder maps any image's tokens back to that image. Pairs are named
"<sample id>#<image index>"; the held-out split is the `holdout` names with the smallest
sha256, so it depends on the names alone, never on shard layout or worker count.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from vpit.errors import ConfigError
from vpit.pipelines.shards import Dataset
from vpit.pipelines.token_cache import TokenCache

__all__ = ["ArrayPairs", "CachePairs", "batch_order", "preprocess", "split_holdout"]


def preprocess(data: bytes | np.ndarray, size: int) -> np.ndarray:
    """Image bytes (or an RGB uint8 array) -> float32 (3, size, size) in [-1, 1]: a centre square
    crop, then a bicubic resize, as MetaMorph prepares images for its SD-1.5 decoder."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB") if isinstance(data, bytes) else Image.fromarray(data)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


class CachePairs:
    """The pairs of a dataset and one of its token caches.

    Args:
        dataset_root: a vpit dataset folder.
        fingerprint: the token cache to read (`vpit precompute` prints it).
        image_size: side the images are resized to.

    Raises:
        CacheError: the cache is missing, stale or partial (the message says how to fix it).
    """

    def __init__(self, dataset_root: str | Path, fingerprint: str, image_size: int):
        self.dataset = Dataset(dataset_root)
        self.cache = TokenCache(dataset_root, fingerprint)
        self.image_size = image_size
        self.m, self.dim = self.cache.m, self.cache.dim
        self._where: list[tuple[int, int, int]] = []
        self.names: list[str] = []
        for shard in range(len(self.dataset.shards)):
            entries = self.dataset.reader(shard).json_index()["samples"]
            for pos, entry in enumerate(entries):
                start, end = self.cache.rows(shard, pos)
                for k in range(end - start):
                    self._where.append((shard, pos, k))
                    self.names.append(f"{entry['id']}#{k}")
        self._memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels (3, S, S) in [-1, 1], tokens (m, d)) of pair i."""
        if i not in self._memo:
            shard, pos, k = self._where[i]
            pixels = preprocess(self.dataset.read(shard, pos).images[k], self.image_size)
            self._memo[i] = (pixels, self.cache.tokens(shard, pos)[k])
            if len(self._memo) > 200_000:  # ~2.5 GB at 32x32: beyond it, read again instead
                self._memo.pop(next(iter(self._memo)))
        return self._memo[i]

    def batch(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        return torch.from_numpy(np.stack([p for p, _ in items])), torch.from_numpy(np.stack([t for _, t in items]))


class ArrayPairs(CachePairs):
    """Pairs from arrays in memory (images (n, H, W, 3) uint8, tokens (n, m, d)): for tests and notebooks."""

    def __init__(self, images: np.ndarray, tokens: np.ndarray, image_size: int, names: list[str] | None = None):
        if len(images) != len(tokens):
            raise ConfigError(f"images and tokens: {len(images)} images but {len(tokens)} token arrays")
        self.image_size = image_size
        self.m, self.dim = int(tokens.shape[1]), int(tokens.shape[2])
        self.names = names or [f"pair-{i:06d}#0" for i in range(len(images))]
        self._memo = {
            i: (preprocess(np.ascontiguousarray(images[i]), image_size), np.asarray(tokens[i], np.float32))
            for i in range(len(images))
        }


def split_holdout(names: list[str], holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), both sorted; held out = the `holdout` smallest sha256 of the names."""
    if not 0 <= holdout < len(names):
        raise ConfigError(f"holdout: expected 0 <= holdout < {len(names)} pairs, got {holdout}")
    digests = [hashlib.sha256(n.encode()).hexdigest() for n in names]
    held = np.sort(np.argsort(digests, kind="stable")[:holdout])
    train = np.setdiff1d(np.arange(len(names)), held)
    return train, held


def batch_order(train: np.ndarray, seed: int, step: int, global_batch: int) -> np.ndarray:
    """The pair indices of global batch `step`: consecutive slots of seeded per-epoch
    permutations of `train`. A pure function of its inputs, so every rank of every world
    size sees the same global sequence, and a rank takes a fixed slice of it."""
    n = len(train)
    slots = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = slots // n, slots % n
    out = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng(np.random.SeedSequence([seed, int(e)])).permutation(n)
        out[epochs == e] = train[perm[offsets[epochs == e]]]
    return out

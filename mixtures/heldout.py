"""The held-out split: samples a mixture never trains on, for evaluation.

A sample is held out when a hash of its id falls below the spec's `heldout` fraction
(`catalog.is_heldout`). The split depends on the id alone, so it is the same for every
cell of a grid, every seed and every world size: no cell trains on another's test data.
"""

from __future__ import annotations

import numpy as np

from vpit.errors import ConfigError
from vpit.mixtures.catalog import RecordReader, build_catalog
from vpit.mixtures.spec import MixtureSpec
from vpit.records import StreamItem

__all__ = ["heldout_items"]


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
    for s in spec.sources:
        cat = build_catalog(s.path, s.kind, f"sources.{s.name}.path", heldout=spec.heldout, split="heldout")
        n = cat.size if max_per_source is None else min(cat.size, max_per_source)
        picks = np.unique(np.linspace(0, cat.size - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)
        shards, positions = cat.locate(picks)
        reader = RecordReader(cat.root, cat.shard_names)
        cache = None
        if spec.cache:
            from vpit.pipelines.token_cache import TokenCache

            cache = TokenCache(cat.root, spec.cache)
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

"""Batch sources: where a rank's micro batches come from, from any position in the stream.

A source has a `plan_hash` (stored in checkpoints) and `batches(start, rank, world_size,
collate, num_workers)`: an iterator of this rank's packed micro batches from global micro
batch `start` on. `MixtureSource` reads a mixture spec through the mixtures package's
deterministic stream (packing runs in DataLoader workers); `ListSource` serves in-memory
items with the same contract (tests, benchmarks, GPU smoke checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from vpit.errors import ConfigError
from vpit.records import StreamItem

__all__ = ["BatchSource", "ListSource", "MixtureSource", "make_source"]


class BatchSource(Protocol):
    plan_hash: str

    def num_batches(self) -> int | None:
        """Global micro batches available (None: unbounded)."""

    def batches(self, start: int, rank: int, world_size: int, collate: Callable, num_workers: int) -> Iterator[Any]: ...


class ListSource:
    """Global micro batch k is items [k*B, (k+1)*B) (cycling); rank r takes its fixed slice."""

    def __init__(self, items: list[StreamItem], global_batch_size: int):
        self.items, self.global_batch_size = items, global_batch_size
        self.token_shape = None
        self.plan_hash = f"list-{len(items)}-{items[0]['id'] if items else ''}"

    def num_batches(self) -> int | None:
        return None  # cycles forever

    def rank_lists(self, start: int, rank: int, world_size: int) -> Iterator[list[StreamItem]]:
        per = self.global_batch_size // world_size
        k = start
        while True:
            base = k * self.global_batch_size + rank * per
            yield [self.items[(base + j) % len(self.items)] for j in range(per)]
            k += 1

    def batches(self, start: int, rank: int, world_size: int, collate: Callable, num_workers: int = 0) -> Iterator[Any]:
        return map(collate, self.rank_lists(start, rank, world_size))


class MixtureSource:
    """A mixture spec -> plan -> `MixtureStream` -> DataLoader(collate in workers)."""

    def __init__(self, spec_path: str, overrides: dict[str, Any], global_batch_size: int):
        from vpit.mixtures import load_spec, make_plan

        self.plan = make_plan(load_spec(spec_path, overrides or None))
        self.plan_hash = self.plan.hash
        self.global_batch_size = global_batch_size
        self.token_shape = (self.plan.m, self.plan.dim) if self.plan.dim else None

    def stream(self, start: int, rank: int, world_size: int) -> Any:
        from vpit.mixtures import MixtureStream

        stream = MixtureStream(self.plan, global_batch_size=self.global_batch_size, rank=rank, world_size=world_size)
        if start > stream.num_batches:
            raise ConfigError(f"resume: the mixture has {stream.num_batches} global batches, the run is at {start}")
        state = stream.state_dict()
        state["consumed"] = int(stream.schedule.starts[start])
        stream.load_state_dict(state)
        return stream

    def num_batches(self) -> int:
        from vpit.mixtures.sampler import make_schedule

        return make_schedule(self.plan, self.global_batch_size).num_batches

    def batches(self, start: int, rank: int, world_size: int, collate: Callable, num_workers: int = 1) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.stream(start, rank, world_size),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=collate,
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
        )
        return iter(loader)


def make_source(data: Any, global_batch_size: int, model: Any) -> BatchSource:
    """The source a DataConfig names. Synthetic items take m and d from the model config."""
    if data.mixture:
        return MixtureSource(data.mixture, dict(data.mixture_overrides), global_batch_size)
    from vpit.train.synthetic import synthetic_items

    return ListSource(synthetic_items(data.synthetic, m=model.num_visual_tokens, d=model.vision_dim), global_batch_size)

"""Batch sources: where a rank's micro batches come from, from any optimizer step on.

The data position is the optimizer step. Step k consumes global batch k of the stream, whose
size is micro_batch_size x world_size x grad_accum, fixed for a run: a change of GPU count at
the same global batch resumes the same sample sequence. A source yields, per step, this rank's
`grad_accum` packed micro batches. `MixtureSource` reads a mixture spec through the mixtures
package's deterministic stream (packing runs in DataLoader workers, micro batches balanced by
estimated tokens); `ListSource` serves in-memory items with the same contract (smoke tests,
benchmarks, GPU checks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from vpit.errors import ConfigError
from vpit.records import StreamItem

__all__ = ["BatchSource", "ListSource", "MixtureSource", "make_source"]


class BatchSource(Protocol):
    plan_hash: str
    global_batch_size: int
    sources: tuple[str, ...]
    """Source names, in a fixed order (per-source metrics)."""
    groups: dict[str, str]
    """Source -> group."""

    def num_steps(self) -> int | None:
        """Optimizer steps the data covers (None: unbounded)."""

    def steps(
        self, start: int, rank: int, world_size: int, micro_batches: int, collate: Any, num_workers: int
    ) -> Iterator[list[Any]]:
        """Per optimizer step from `start` on: this rank's `micro_batches` packed batches."""


class ListSource:
    """Global batch k is items [k*B, (k+1)*B) (cycling); rank r takes its contiguous slice, split
    in order into micro batches."""

    def __init__(self, items: list[StreamItem], global_batch_size: int):
        self.items, self.global_batch_size = items, global_batch_size
        self.token_shape = None
        self.plan_hash = f"list-{len(items)}-{items[0]['id'] if items else ''}"
        self.sources = tuple(sorted({it["source"] for it in items}))
        self.groups = {it["source"]: it["group"] for it in items}
        self.group_names = tuple(sorted({it["group"] for it in items}))

    def num_steps(self) -> int | None:
        return None

    def rank_items(self, k: int, rank: int, world_size: int, micro_batches: int) -> list[StreamItem]:
        b = self.global_batch_size
        lo, hi = b * rank // world_size, b * (rank + 1) // world_size
        return [
            dict(self.items[(k * b + j) % len(self.items)], micro=(j - lo) * micro_batches // (hi - lo))
            for j in range(lo, hi)
        ]

    def steps(
        self, start: int, rank: int, world_size: int, micro_batches: int, collate: Any, num_workers: int = 0
    ) -> Iterator[list[Any]]:
        k = start
        while True:
            yield collate.step(self.rank_items(k, rank, world_size, micro_batches), micro_batches)
            k += 1


class _StepCollate:
    """DataLoader collate_fn: one step's items -> its micro batches (picklable for workers)."""

    def __init__(self, collate: Any, micro_batches: int):
        self.collate, self.micro_batches = collate, micro_batches

    def __call__(self, items: list[StreamItem]) -> list[Any]:
        return self.collate.step(items, self.micro_batches)


def _closing(batches: Iterator[list[Any]]) -> Iterator[list[Any]]:
    """The loader's batches as a generator whose close() frees the loader at once, which stops its
    workers. They ignore SIGTERM (see below), so one left running at exit hangs the process:
    freeing it must not wait for a garbage collection, as it would while a reference cycle holds
    the caller's frame (matplotlib keeps such cycles after drawing the loss curve)."""
    try:
        yield from batches
    finally:
        del batches


def _ignore_preemption(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: torchrun signals the whole process group, and a
    worker that died of it would fail the trainer's step instead of letting it checkpoint."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class MixtureSource:
    """A mixture spec -> plan -> `MixtureStream` -> DataLoader(collate in workers)."""

    def __init__(
        self,
        spec_path: str,
        overrides: dict[str, Any],
        global_batch_size: int,
        balance: bool = True,
        plan_dir: str | Path | None = None,
    ):
        from vpit.mixtures import load_spec, make_plan
        from vpit.mixtures.plan import load_plan, save_plan

        spec = load_spec(spec_path, overrides or None)
        if plan_dir is None:
            self.plan = make_plan(spec)
        else:  # planned once, by rank 0; every rank (and loader worker) maps the saved plan
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized()
            if not distributed or dist.get_rank() == 0:
                save_plan(make_plan(spec), plan_dir)
            if distributed:
                dist.barrier()
            self.plan = load_plan(plan_dir, spec)
        self.plan_hash = self.plan.hash
        self.global_batch_size = global_batch_size
        self.balance = balance
        self.token_shape = (self.plan.m, self.plan.dim) if self.plan.dim else None
        self.sources = tuple(s.name for s in self.plan.sources)
        self.groups = {s.name: s.group for s in self.plan.sources}
        self.group_names = tuple(g for g, _ in self.plan.groups)

    def stream(self, start: int, rank: int, world_size: int, micro_batches: int = 1) -> Any:
        from vpit.mixtures import MixtureStream

        stream = MixtureStream(
            self.plan,
            global_batch_size=self.global_batch_size,
            rank=rank,
            world_size=world_size,
            micro_batches=micro_batches,
            balance=self.balance,
        )
        if start > stream.num_batches:
            raise ConfigError(f"resume: the mixture has {stream.num_batches} global batches, the run is at {start}")
        state = stream.state_dict()
        state["consumed"] = int(stream.schedule.starts[start])
        stream.load_state_dict(state)
        return stream

    def num_steps(self) -> int:
        from vpit.mixtures.sampler import make_schedule

        return make_schedule(self.plan, self.global_batch_size).num_batches

    def steps(
        self, start: int, rank: int, world_size: int, micro_batches: int, collate: Any, num_workers: int = 1
    ) -> Iterator[list[Any]]:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.stream(start, rank, world_size, micro_batches),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_StepCollate(collate, micro_batches),
            worker_init_fn=_ignore_preemption if num_workers else None,
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
        )
        return _closing(iter(loader))


def make_source(data: Any, global_batch_size: int, model: Any, plan_dir: str | Path | None = None) -> BatchSource:
    """The source a DataConfig names (a mixture is planned once into `plan_dir`). Synthetic items
    take m and d from the model config."""
    if data.mixture:
        return MixtureSource(data.mixture, dict(data.mixture_overrides), global_batch_size, data.balance, plan_dir)
    from vpit.train.synthetic import synthetic_items

    return ListSource(synthetic_items(data.synthetic, m=model.num_visual_tokens, d=model.vision_dim), global_batch_size)

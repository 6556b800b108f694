"""`MixtureStream`: the trainer's view of a plan, as a PyTorch IterableDataset.

Each step yields this rank's slice of one global batch, as a list of items (dicts). The
global sequence comes from `mixtures.sampler` and never depends on the number of ranks
or loader workers:

- rank r of W takes the contiguous slice [b r / W, b (r + 1) / W) of each global batch;
- loader worker j of w yields batches k0 + j, k0 + j + w, ...; DataLoader's round-robin
  over workers then restores the order (use `batch_size=None`);
- the resume state is the number of global samples consumed (whole batches) and the
  plan hash, so it restores onto any world size.

Reads go through the shard's binary index (`RecordReader`, one pread per record) and the
token cache (one pread per sample), each keeping a bounded number of shards open; a small
thread pool works a few batches ahead of the consumer, so file I/O overlaps training (pread
releases the GIL).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vpit.errors import ConfigError, VpitError
from vpit.mixtures.catalog import RecordReader
from vpit.mixtures.plan import Plan
from vpit.mixtures.sampler import balance_bins, batch_slots, locate, make_schedule
from vpit.pipelines.open_files import OpenFiles
from vpit.records import StreamItem

__all__ = ["MixtureStream"]


class MixtureStream(torch.utils.data.IterableDataset):
    """This rank's slices of the plan's global batches, with cached visual tokens.

    Args:
        plan: from `make_plan`.
        global_batch_size: samples per global batch (all ranks, one optimizer step).
        rank: this process's rank in [0, world_size).
        world_size: number of data-parallel ranks.
        with_tokens: attach each sample's visual tokens from the plan's token cache.
        prefetch_batches: batches read ahead of the consumer.
        threads: reader threads per process (per loader worker).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        with_tokens: bool = True,
        micro_batches: int = 1,
        balance: bool = False,
        prefetch_batches: int = 4,
        threads: int = 4,
    ):
        super().__init__()
        if not (isinstance(world_size, int) and world_size > 0 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if isinstance(global_batch_size, int) and global_batch_size < world_size:
            raise ConfigError(
                f"global_batch_size: {global_batch_size} is less than world_size {world_size}; "
                "every rank needs at least one sample per batch"
            )
        if with_tokens and plan.spec.cache is None:
            raise ConfigError(
                f"cache: {plan.spec.origin} names no token cache, so there are no visual tokens to "
                "attach; add cache: FINGERPRINT (vpit precompute prints it) or use with_tokens=False"
            )
        self.plan = plan
        self.schedule = make_schedule(plan, global_batch_size)
        self._phases = [p.name for p in plan.phase_plans() if p.total]  # index: Schedule.slot_phases
        self.global_batch_size = int(global_batch_size)
        self.rank, self.world_size = rank, world_size
        self.with_tokens = with_tokens
        if micro_batches < 1 or global_batch_size < world_size * micro_batches:
            raise ConfigError(
                f"micro_batches: {micro_batches} per rank x {world_size} ranks need a global batch of at least "
                f"{world_size * micro_batches}, got {global_batch_size}"
            )
        self.micro_batches, self.balance = micro_batches, balance
        self.prefetch_batches = max(1, prefetch_batches)
        self.threads = max(1, threads)
        self._consumed = 0

    @property
    def num_batches(self) -> int:
        """Global batches in the whole run (the last one may be short)."""
        return self.schedule.num_batches

    @property
    def consumed(self) -> int:
        """Global samples handed out so far (counted in this process; see `state_dict`)."""
        return self._consumed

    def state_dict(self) -> dict[str, Any]:
        """{"consumed", "plan_hash", "global_batch_size"}: all it takes to resume anywhere.

        Counts the batches this object yielded in this process: iterate it directly or
        through a DataLoader with num_workers=0, or use `loader()`, which counts batches as the
        DataLoader hands them out; with a bare multi-worker DataLoader call `advance()`.
        """
        return {"consumed": self._consumed, "plan_hash": self.plan.hash, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state["consumed"]` samples. Refuses another plan or batch size."""
        if state.get("plan_hash") != self.plan.hash:
            raise ConfigError(
                f"plan_hash: the checkpoint was made with plan {state.get('plan_hash')} but this mixture "
                f"plans to {self.plan.hash}; resume with the same spec and data, or start a new run"
            )
        b = state.get("global_batch_size", self.global_batch_size)
        if b != self.global_batch_size:
            raise ConfigError(
                f"global_batch_size: the checkpoint used {b}, this run {self.global_batch_size}; the "
                "batch composition depends on it, so keep it (change ranks or accumulation instead)"
            )
        consumed = int(state["consumed"])
        starts = self.schedule.starts
        if consumed not in set(starts.tolist()):
            raise ConfigError(
                f"consumed: {consumed} is not at a global batch boundary of this plan "
                f"(batches of {self.global_batch_size}, {int(starts[-1])} samples in all)"
            )
        self._consumed = consumed

    def advance(self, batches: int = 1) -> None:
        """Record that the consumer took `batches` more global batches (for bare multi-worker loaders)."""
        k = self.schedule.batch_of(self._consumed) if self._consumed < self.schedule.starts[-1] else self.num_batches
        self._consumed = int(self.schedule.starts[min(self.num_batches, k + batches)])

    def loader(self, num_workers: int = 0, collate_fn=None, **kwargs) -> Iterator:
        """A DataLoader over this stream that keeps `state_dict()` current with any num_workers."""
        dl = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=num_workers, collate_fn=collate_fn or _identity, **kwargs
        )
        for batch in dl:
            if num_workers > 0:  # with workers the iteration below runs elsewhere; count here
                self.advance(1)
            yield batch

    def rank_slice(self, k: int) -> tuple[int, int]:
        """[lo, hi) of global batch k (offsets within the batch) that this rank yields."""
        b = int(self.schedule.starts[k + 1] - self.schedule.starts[k])
        return b * self.rank // self.world_size, b * (self.rank + 1) // self.world_size

    def _my_batches(self) -> range:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        k0 = self.schedule.batch_of(self._consumed) if self._consumed < self.schedule.starts[-1] else self.num_batches
        return range(k0 + worker, self.num_batches, workers)

    def __iter__(self) -> Iterator[list[StreamItem]]:
        in_main = torch.utils.data.get_worker_info() is None
        # One LRU of open tars and one of open token files for all sources: the bound on open
        # files holds per loader process, however many sources the mixture has.
        tars, token_files = OpenFiles(), OpenFiles()
        readers = [
            RecordReader(s.catalog.root, s.catalog.shard_names, versions=s.catalog.shard_versions, files=tars)
            for s in self.plan.sources
        ]
        caches = self._open_caches(token_files) if self.with_tokens else None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vpit-mix-read")
        pending: deque = deque()
        batches = iter(self._my_batches())
        try:
            for k in batches:
                pending.append((k, pool.submit(self._load, k, readers, caches)))
                if len(pending) >= self.prefetch_batches:
                    break
            while pending:
                k, future = pending.popleft()
                batch = future.result()
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._load, nxt, readers, caches)))
                if in_main:  # in a loader worker this copy's count is never seen; see state_dict
                    self._consumed = int(self.schedule.starts[k + 1])
                yield batch
        finally:
            for _, f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            tars.close()
            token_files.close()

    def _open_caches(self, files: OpenFiles) -> list:
        from vpit.pipelines.token_cache import TokenCache

        # verified: the planner checked every shard of every cache once for the whole run
        return [
            TokenCache(
                s.catalog.root,
                self.plan.spec.cache,
                shard_names=s.catalog.shard_names,
                verified=True,
                files=files,
                versions=s.catalog.shard_versions,
            )
            for s in self.plan.sources
        ]

    def _load(self, k: int, readers: list[RecordReader], caches: list | None) -> list[StreamItem]:
        """This rank's items of global batch k, each with its micro step. Contiguous slices, or,
        with `balance`, (rank, micro step) bins of equal estimated tokens: ZeRO-3 steps at the pace
        of the slowest rank, and a global batch mixes 60-token generation samples with
        thousand-token conversations. Either way the global batch holds the same samples."""
        src, draw = batch_slots(self.plan, self.schedule, k)
        slot_phase = self.schedule.slot_phases(k, src, draw) if len(self._phases) > 1 else None
        bins = self.world_size * self.micro_batches
        if self.balance and bins > 1:
            shards, positions = locate(self.plan, src, draw)
            costs = [
                readers[s].cost(sh, p, self.plan.m)
                for s, sh, p in zip(src.tolist(), shards.tolist(), positions.tolist(), strict=True)
            ]
            where = balance_bins(np.asarray(costs), bins)
            mine = np.flatnonzero(where // self.micro_batches == self.rank)
            micro = where[mine] % self.micro_batches
            src, shards, positions = src[mine], shards[mine], positions[mine]
        else:
            lo, hi = self.rank_slice(k)
            mine = np.arange(lo, hi)
            micro = (mine - lo) * self.micro_batches // max(1, hi - lo)
            shards, positions = locate(self.plan, src[lo:hi], draw[lo:hi])
            src = src[lo:hi]
        start = int(self.schedule.starts[k])
        items = []
        for i, s, shard, pos, j in zip(
            mine.tolist(), src.tolist(), shards.tolist(), positions.tolist(), micro.tolist(), strict=True
        ):
            sp = self.plan.sources[s]
            item = {"index": start + i, "source": sp.name, "group": sp.group}
            if slot_phase is not None:
                item["phase"] = self._phases[int(slot_phase[i])]
            try:
                record = readers[s].record(shard, pos)
                item.update(id=record["id"], record=record)
                if caches is not None:
                    item["tokens"] = np.asarray(caches[s].tokens(shard, pos), dtype=np.float32)
            except (VpitError, ValueError, OSError, IndexError) as e:
                # an unreadable record (corrupt member, truncated token file) is skipped in place: the
                # rest of the sequence does not move; the trainer logs it and keeps an error budget
                item.pop("record", None)
                item["id"] = item.get("id") or _id_or_place(readers[s], sp.name, shard, pos)
                item["skipped"] = f"{type(e).__name__}: {e}"
            if self.micro_batches > 1:
                item["micro"] = j
            items.append(item)
        return items


def _id_or_place(reader: RecordReader, source: str, shard: int, pos: int) -> str:
    try:
        return reader.sample_id(shard, pos)
    except (VpitError, ValueError, OSError, IndexError):  # the index itself is unreadable
        return f"{source}:{reader.names[shard]}#{pos}"


def _identity(batch):
    return batch

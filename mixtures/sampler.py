"""The sampler: pure numpy functions of (plan, global batch size, global sample index).

- `make_schedule` runs the quota method once per (plan, B): how many draws each source
  gets in each global batch (`mixtures.quota`), kept as cumulative counts, so batch k's
  draws from source s are draws[k, s] .. draws[k + 1, s] - 1. Phases run one after the
  other; a batch that straddles a phase boundary holds a segment of each, and each segment
  keeps its phase's per-batch bound. A source's draws run on across phases, so its
  permutation continues and never restarts.
- The j-th draw from a source is element j mod size of a seeded permutation of its
  eligible samples, a fresh permutation per pass (epoch = j // size). With repetition
  every sample thus appears floor or ceil of count / size times, never more. The
  permutation is a keyed bijection (`feistel_permute`), computed for the draws asked for:
  O(1) memory per source, for any number of sources and any source size.
- Inside a batch, a permutation seeded by (seed, k) orders the slots, so a batch is not
  sorted by source.

Nothing here depends on ranks, workers or wall clock: the global sequence is fixed by
the plan and B, and ranks/workers only choose which part of it they materialise.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from vpit.errors import ConfigError
from vpit.mixtures.quota import segment_schedule, split_schedule

__all__ = [
    "SAMPLER_VERSION",
    "Schedule",
    "balance_bins",
    "batch_slots",
    "locate",
    "make_schedule",
    "sample_at",
    "source_items",
]

SAMPLER_VERSION = 2  # 2: Feistel permutations (1: materialised numpy permutations)
_PURPOSE_SOURCE = 1  # SeedSequence purposes: independent streams for the two kinds of shuffle
_PURPOSE_BATCH = 2
_ROUNDS = 6


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Per-batch draw counts of a plan at one global batch size."""

    batch_size: int
    starts: np.ndarray
    """int64 (K + 1,): global index of each batch's first sample; starts[K] = total."""
    draws: np.ndarray
    """int64 (K + 1, sources): draws of each source before batch k."""
    group_of: np.ndarray
    """int64 (sources,): index of each source's group in plan.groups."""
    segments: tuple[tuple[int, np.ndarray], ...] = ()
    """Per phase: (its first batch, int64 (batches it spans, sources) of its draws in each)."""

    @property
    def num_batches(self) -> int:
        return len(self.starts) - 1

    def slot_phases(self, k: int, src: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """The phase (index into the plan's phases with samples) of each slot of batch k: within
        a batch a source's earlier draws belong to the earlier phase."""
        parts = [(p, seg[k - first]) for p, (first, seg) in enumerate(self.segments) if first <= k < first + len(seg)]
        if len(parts) <= 1:
            return np.full(len(src), parts[0][0] if parts else 0, dtype=np.int64)
        cum = np.cumsum([counts for _, counts in parts], axis=0)  # (parts, sources)
        offset = draw - self.draws[k][src]
        which = (offset[None, :] >= cum[:, src]).sum(axis=0)
        return np.array([p for p, _ in parts], dtype=np.int64)[which]

    def batch_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right") - 1)


def make_schedule(plan, batch_size: int) -> Schedule:
    """The per-batch source counts of `plan` for global batches of `batch_size`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ConfigError(f"global_batch_size: expected a positive integer, got {batch_size!r}")
    groups = [g for g, _ in plan.groups]
    b = int(batch_size)
    per_source = np.zeros((-(-plan.total // b), len(plan.sources)), dtype=np.int64)
    start, segments = 0, []
    for phase in plan.phase_plans():
        end = start + phase.total
        if end == start:
            continue
        first, last = start // b, -(-end // b)  # the batches this phase has a segment in
        cuts = [start, *range((first + 1) * b, last * b, b), end]
        per_group = segment_schedule([c for _, c in phase.groups], np.diff(cuts).tolist())
        counts = dict(phase.counts)
        mine = np.zeros((last - first, len(plan.sources)), dtype=np.int64)
        for gi, g in enumerate(groups):
            members = [i for i, s in enumerate(plan.sources) if s.group == g]
            mine[:, members] = split_schedule([counts[plan.sources[i].name] for i in members], per_group[:, gi])
        per_source[first:last] += mine
        segments.append((first, mine))
        start = end
    draws = np.zeros((per_source.shape[0] + 1, per_source.shape[1]), dtype=np.int64)
    np.cumsum(per_source, axis=0, out=draws[1:])
    starts = draws.sum(axis=1)
    group_of = np.array([groups.index(s.group) for s in plan.sources], dtype=np.int64)
    return Schedule(batch_size=b, starts=starts, draws=draws, group_of=group_of, segments=tuple(segments))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a strong 64-bit mixing of uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(keys: np.ndarray, size: int, j: np.ndarray) -> np.ndarray:
    """Element j of a keyed permutation of range(size), for an array of j in [0, size).

    A balanced Feistel network on the smallest even number of bits that covers `size` is a
    bijection of [0, 2^bits); cycle-walking (apply it again while the value is >= size)
    restricts it to a bijection of [0, size). The domain is under 4x size, so a walk takes
    under 4 rounds on average. Nothing is materialised: memory is O(len(j))."""
    bits = max(2, (int(size - 1).bit_length() + 1) // 2 * 2)
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    x = np.asarray(j, dtype=np.uint64).copy()
    todo = np.arange(len(x))
    while len(todo):
        v = x[todo]
        left, right = v >> half, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        v = (left << half) | right
        x[todo] = v
        todo = todo[v >= np.uint64(size)]
    return x.astype(np.int64)


def _round_keys(seed: int, name: str, epoch: int) -> np.ndarray:
    # crc32 of the name, not Python's hash(): stable across processes and runs.
    ss = np.random.SeedSequence([seed, _PURPOSE_SOURCE, zlib.crc32(name.encode()), epoch])
    return ss.generate_state(_ROUNDS, dtype=np.uint64)


def source_items(seed: int, name: str, size: int, draws: np.ndarray) -> np.ndarray:
    """Eligible-sample numbers of draws `draws` (j = 0, 1, ...) from source `name` of `size` samples."""
    with np.errstate(over="ignore"):
        draws = np.asarray(draws, dtype=np.int64)
        out = np.empty_like(draws)
        epochs = draws // size
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = feistel_permute(_round_keys(seed, name, int(e)), size, draws[sel] - e * size)
        return out


def batch_slots(plan, schedule: Schedule, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, draw number) of every sample of global batch k, in global order."""
    lo, hi = schedule.draws[k], schedule.draws[k + 1]
    src = np.repeat(np.arange(len(plan.sources)), hi - lo)
    draw = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)]) if len(src) else src
    order = np.random.default_rng(np.random.SeedSequence([plan.seed, _PURPOSE_BATCH, k])).permutation(len(src))
    return src[order], draw[order]


def locate(plan, sources: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, position) of each (source index, draw number) pair."""
    shards = np.empty(len(sources), dtype=np.int64)
    positions = np.empty(len(sources), dtype=np.int64)
    for s in np.unique(sources):
        sel = sources == s
        sp = plan.sources[int(s)]
        items = source_items(plan.seed, sp.name, sp.catalog.size, draws[sel])
        shards[sel], positions[sel] = sp.catalog.locate(items)
    return shards, positions


def sample_at(plan, schedule: Schedule, index: int) -> tuple[str, int, int]:
    """(source name, shard, position) of global sample `index`: the sampler as one pure call."""
    if not 0 <= index < schedule.starts[-1]:
        raise IndexError(f"sample index {index} outside the run's {int(schedule.starts[-1])} samples")
    k = schedule.batch_of(index)
    src, draw = batch_slots(plan, schedule, k)
    i = index - int(schedule.starts[k])
    shard, pos = locate(plan, src[i : i + 1], draw[i : i + 1])
    return plan.sources[int(src[i])].name, int(shard[0]), int(pos[0])


def balance_bins(costs: np.ndarray, bins: int) -> np.ndarray:
    """The bin (0..bins-1) of each item, filling the least loaded bin with the next costliest item
    (LPT; ties to the earlier item and the lower bin), so every bin ends within one item's cost of
    the others. A pure function of the costs: every rank computes the same assignment."""
    import heapq

    costs = np.asarray(costs, dtype=np.int64)
    out = np.empty(len(costs), dtype=np.int64)
    heap = [(0, b) for b in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, b = heapq.heappop(heap)
        out[i] = b
        heapq.heappush(heap, (load + int(costs[i]), b))
    return out

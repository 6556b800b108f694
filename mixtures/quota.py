"""Integer apportionment: split totals exactly, and spread a run's counts over its batches.

`apportion` is the largest-remainder method (exact rational arithmetic, ties to the
earlier part). `group_schedule` spreads planned group counts n_g over batches of size B
so that every batch holds floor or ceil of b * n_g / N of each group (the per-batch
bound) and every cumulative count stays floor or ceil of its ideal t * n_g / N, which
makes the totals exact. Handing out the slots left after the floors is Pfair scheduling
(tasks of weight frac(B p_g) on that many processors), solved by the PD² rule.
`split_schedule` then splits each batch's group count among the group's sources, keeping
every source's cumulative count within one sample of its share.

Both check their own output and raise rather than return a schedule that breaks these
promises; the property tests run them over thousands of random cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import combinations

import numpy as np

from vpit.errors import ConfigError

__all__ = ["apportion", "group_schedule", "segment_schedule", "split_schedule"]


def apportion(total: int, weights: Sequence[float | int | Fraction]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, exact)."""
    w = [Fraction(x) for x in weights]
    s = sum(w)
    if total < 0 or s <= 0 or any(x < 0 for x in w):
        raise ConfigError(f"apportion: need total >= 0 and weights >= 0 with a positive sum, got {total}, {weights}")
    quotas = [total * x / s for x in w]
    out = [q.numerator // q.denominator for q in quotas]
    rest = total - sum(out)
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return out


def _pd2_key(i: int, a: int, n: int) -> tuple[int, int, int]:
    """PD² priority of subtask i (1-based) of a task with weight a/n, 0 < a < n; smaller is first.

    Pseudo-deadline ceil(i/w); ties go to b-bit 1 (its window overlaps the next one's),
    then to the larger group deadline (heavy tasks only). Anderson & Srinivasan, "Mixed
    Pfair/ERfair scheduling of asynchronous periodic tasks", JCSS 2004.
    """
    deadline = -((-i * n) // a)
    bbit = deadline - (i * n) // a
    group = 0
    if 2 * a >= n:  # heavy: D = ceil(ceil(d (1 - w)) / (1 - w))
        x = -((-deadline * (n - a)) // n)
        group = -((-x * n) // (n - a))
    return deadline, -bbit, -group


def group_schedule(counts: Sequence[int], batch_size: int) -> np.ndarray:
    """Per-batch counts of each part, shape (ceil(N / B), parts), for batches of `batch_size`
    (the last one holds the remainder). Every entry is floor or ceil of b * n_g / N and every
    cumulative count is floor or ceil of its ideal, so the totals come out exact.

    A full batch gives each part floor(B p_g); the fractional parts w_g = frac(B p_g) sum to
    the r slots left, and handing those out is exactly Pfair scheduling of tasks of weight
    w_g on r processors (at most one extra per part per batch, lag strictly within one),
    for which the PD² priority rule is optimal. Cost: O(N / B * parts) Python steps.
    """
    n = [int(c) for c in counts]
    total, b = sum(n), int(batch_size)
    if b <= 0 or any(c < 0 for c in n) or total <= 0:
        raise ConfigError(
            f"group_schedule: need batch_size > 0 and non-negative counts with a positive sum, got {b}, {n}"
        )
    full, last = divmod(total, b)
    base = [b * c // total for c in n]
    frac = [b * c % total for c in n]  # w_g = frac_g / total
    extra = b - sum(base)
    out = np.zeros((full + (1 if last else 0), len(n)), dtype=np.int64)
    done = [0] * len(n)  # extra units handed out so far, per part
    parts = [g for g in range(len(n)) if frac[g]]
    for t in range(full):
        # Subtask done[g] + 1 is released at slot floor(done * total / frac).
        ready = [g for g in parts if done[g] * total // frac[g] <= t]
        ready.sort(key=lambda g: (*_pd2_key(done[g] + 1, frac[g], total), g))
        if len(ready) < extra:
            raise RuntimeError(
                f"group_schedule: batch {t} has {len(ready)} parts ready for {extra} slots "
                f"(counts={n}, B={b}); this is a bug"
            )
        for g in ready[:extra]:
            done[g] += 1
        out[t] = base
        out[t, ready[:extra]] += 1
    if last:
        out[full] = np.asarray(n) - out[:full].sum(axis=0)
    _check(out, n, [b] * full + ([last] if last else []), per_batch=True)
    return out


def segment_schedule(counts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """Like `group_schedule`, for segments of any sizes (a phase that starts or ends inside a
    global batch: its part of that batch is a segment). Shape (len(sizes), parts); every entry
    is floor or ceil of b_k n_g / N and every cumulative count floor or ceil of its ideal.

    At each segment end T_k a part is rounded down or up (X = floor or ceil of T_k p_g, with
    sum_g frac(T_k p_g) parts up). Writing r = frac(T_k p_g), a segment keeps its bound exactly
    when a part goes from down to up only as r grows and from up to down only as r falls. The
    rounded-up sets form a small state space (subsets of the parts with a fraction), searched
    forward with back-pointers. A path always exists: the constraints (segment sums, and each
    part's prefix sums) are two laminar families, so their polytope is integral, and it holds
    the ideal x = b_k p_g. Whole batches after an aligned start take `group_schedule` (PD²)."""
    n = [int(c) for c in counts]
    sizes = [int(x) for x in sizes]
    total = sum(n)
    if total <= 0 or any(c < 0 for c in n) or any(x <= 0 for x in sizes) or sum(sizes) != total:
        raise ConfigError(f"segment_schedule: need positive sizes summing to the counts' total, got {sizes}, {n}")
    if len(sizes) == 1:
        return np.asarray([n], dtype=np.int64)
    if all(x == sizes[0] for x in sizes[:-1]) and sizes[-1] <= sizes[0]:
        return group_schedule(n, sizes[0])
    active = [g for g, c in enumerate(n) if 0 < c < total]
    ends = np.cumsum(sizes).tolist()
    rems = [[(t * n[g]) % total for g in active] for t in ends]
    prev_r = [0] * len(active)
    layers: list[dict[int, int]] = []
    states = {0: -1}
    for k, r in enumerate(rems):
        ups = sum(r) // total
        nxt: dict[int, int] = {}
        for mask in states:
            forced, optional = 0, []
            for i in range(len(active)):
                up = mask >> i & 1
                if up and r[i] and r[i] >= prev_r[i]:
                    forced |= 1 << i
                elif (up and r[i] and r[i] < prev_r[i]) or (not up and r[i] > prev_r[i]):
                    optional.append(i)
            need = ups - forced.bit_count()
            if not 0 <= need <= len(optional):
                continue
            for pick in combinations(optional, need):
                new = forced | sum(1 << i for i in pick)
                nxt.setdefault(new, mask)
        if not nxt:
            raise RuntimeError(
                f"segment_schedule: no rounding for segment {k} (counts={n}, sizes={sizes}); this is a bug"
            )
        layers.append(nxt)
        states, prev_r = nxt, r
    cum = np.zeros((len(sizes) + 1, len(n)), dtype=np.int64)
    mask = 0  # the last end is the total: every part whole
    for k in range(len(sizes) - 1, -1, -1):
        for g in range(len(n)):
            cum[k + 1, g] = ends[k] * n[g] // total
        for i, g in enumerate(active):
            cum[k + 1, g] += mask >> i & 1
        mask = layers[k][mask]
    out = np.diff(cum, axis=0)
    _check(out, n, sizes, per_batch=True)
    return out


def split_schedule(counts: Sequence[int], batch_totals: Sequence[int]) -> np.ndarray:
    """Split each batch's total among parts (a group's count among its sources): shape
    (len(batch_totals), parts). Every cumulative count stays floor or ceil of its ideal
    share of the cumulative total, so the totals come out exact; a batch's count is then
    within two of its share (not one: totals vary from batch to batch).

    Earliest deadline first among parts whose next unit is released; for unit jobs with
    release times and deadlines EDF is optimal, and the windows satisfy Hall's condition.
    """
    n = [int(c) for c in counts]
    total = sum(n)
    sizes = [int(x) for x in batch_totals]
    if sum(sizes) != total or any(c < 0 for c in n) or any(x < 0 for x in sizes):
        raise ConfigError(f"split_schedule: batch totals sum to {sum(sizes)} but counts sum to {total}")
    out = np.zeros((len(sizes), len(n)), dtype=np.int64)
    if total == 0:
        return out
    cum = [0] * len(n)
    t = 0
    for k, size in enumerate(sizes):
        t += size
        lo = [max(0, t * c // total - cum[g]) for g, c in enumerate(n)]
        hi = [-((-t * c) // total) - cum[g] for g, c in enumerate(n)]
        take = lo[:]
        rest = size - sum(lo)
        # Hand out one unit at a time to the part owed soonest: its next unit is due at (cum+take+1)/p.
        while rest > 0:
            cand = [g for g in range(len(n)) if take[g] < hi[g]]
            if not cand:
                raise RuntimeError(f"split_schedule: batch {k} cannot be filled (counts={n}); this is a bug")
            g = cand[0]  # smallest (cum + take + 1) / n, compared exactly by cross-multiplying
            for h in cand[1:]:
                if (cum[h] + take[h] + 1) * n[g] < (cum[g] + take[g] + 1) * n[h]:
                    g = h
            take[g] += 1
            rest -= 1
        for g in range(len(n)):
            cum[g] += take[g]
        out[k] = take
    _check(out, n, sizes, per_batch=False)
    return out


def _check(out: np.ndarray, n: list[int], sizes: list[int], per_batch: bool) -> None:
    """Refuse to return a schedule that breaks its promises (cheap next to building it)."""
    total = sum(n)
    # int64 is exact while total**2 fits; beyond that, Python integers (slow but exact).
    dt = np.int64 if total < 2**31 else object
    counts = np.asarray(n, dtype=dt)
    if not np.array_equal(out.sum(axis=1), np.asarray(sizes)) or out.sum(axis=0).tolist() != n or (out < 0).any():
        raise RuntimeError(f"schedule does not add up (counts={n}); this is a bug")
    cum_t = np.cumsum(np.asarray(sizes, dtype=dt))
    cum = np.cumsum(out.astype(dt), axis=0)
    # |cum * total - t * n| < total, in exact integers
    if (abs(cum * total - cum_t[:, None] * counts[None, :]) >= total).any():
        raise RuntimeError(f"schedule strays a whole sample from the ideal (counts={n}); this is a bug")
    if per_batch:
        dev = abs(out.astype(dt) * total - np.asarray(sizes, dtype=dt)[:, None] * counts[None, :])
        if (dev >= total).any():
            raise RuntimeError(f"schedule breaks the per-batch bound (counts={n}); this is a bug")

"""`vpit mix inspect`: the realised composition of the first batches, a ratio plot, lineage.

The first `steps` global batches are read through the real stream (records from the
shards), tallied per group (and phase) and compared with the plan. The plot shows each
group's share per step over the whole run against the plan, from the schedule (no reads
needed: the sequence is a pure function of the plan), with the inspected stretch marked. Lineage writes the
sample ids of every step as JSON lines, so any run can be audited: the ids depend only on
the plan and the global batch size, never on ranks or workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vpit.mixtures.catalog import RecordReader
from vpit.mixtures.plan import Plan
from vpit.mixtures.sampler import Schedule, batch_slots, locate, make_schedule
from vpit.mixtures.stream import MixtureStream

__all__ = ["group_counts", "inspect_mixture", "lineage_ids", "planned_shares", "plot_group_ratio"]


def _by_group(plan: Plan, schedule: Schedule, per_source: np.ndarray) -> np.ndarray:
    """(rows, sources) counts summed into (rows, groups)."""
    out = np.zeros((per_source.shape[0], len(plan.groups)), dtype=np.int64)
    for s, g in enumerate(schedule.group_of):
        out[:, g] += per_source[:, s]
    return out


def group_counts(plan: Plan, schedule: Schedule) -> np.ndarray:
    """(batches, groups) samples per group in every global batch, from the schedule alone."""
    return _by_group(plan, schedule, np.diff(schedule.draws, axis=0))


def lineage_ids(plan: Plan, batch_size: int, start: int = 0, stop: int | None = None):
    """Yield (step, [sample ids]) for global batches [start, stop), from the shard indexes (no tar reads)."""
    schedule = make_schedule(plan, batch_size)
    readers = [
        RecordReader(s.catalog.root, s.catalog.shard_names, versions=s.catalog.shard_versions) for s in plan.sources
    ]
    try:
        for k in range(start, schedule.num_batches if stop is None else min(stop, schedule.num_batches)):
            src, draw = batch_slots(plan, schedule, k)
            shards, positions = locate(plan, src, draw)
            yield (
                k,
                [
                    readers[s].sample_id(sh, p)
                    for s, sh, p in zip(src.tolist(), shards.tolist(), positions.tolist(), strict=True)
                ],
            )
    finally:
        for r in readers:
            r.close()


def planned_shares(plan: Plan, schedule: Schedule) -> np.ndarray:
    """(batches, groups): each group's planned share of every global batch; a batch that holds
    segments of two phases mixes their shares by the segments' sizes."""
    sizes = np.diff(schedule.starts).astype(float)
    out = np.zeros((schedule.num_batches, len(plan.groups)))
    for (first, seg), phase in zip(schedule.segments, (p for p in plan.phase_plans() if p.total), strict=True):
        share = np.array([n for _, n in phase.groups], dtype=float) / phase.total
        out[first : first + len(seg)] += seg.sum(axis=1, keepdims=True) * share[None, :]
    return out / sizes[:, None]


def plot_group_ratio(plan: Plan, schedule: Schedule, path: Path, inspected: int = 0) -> Path:
    """PNG of each group's share of every global batch (thin), its share so far in the phase
    (solid) and the plan (dashed), with the phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = schedule.batch_size
    counts = group_counts(plan, schedule)
    sizes = counts.sum(axis=1, keepdims=True)
    planned = planned_shares(plan, schedule)
    steps = np.arange(1, len(counts) + 1)
    running = np.zeros_like(planned)  # each phase's own segments only
    for first, seg in schedule.segments:
        c = np.cumsum(_by_group(plan, schedule, seg), axis=0)
        running[first : first + len(seg)] = c / c.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for gi, (g, n_g) in enumerate(plan.groups):
        (line,) = ax.plot(steps, running[:, gi], label=f"{g} ({n_g:,})", linewidth=1.6)
        ax.plot(steps, counts[:, gi] / sizes[:, 0], color=line.get_color(), linewidth=0.5, alpha=0.45)
        ax.plot(steps, planned[:, gi], color=line.get_color(), linestyle="--", linewidth=1.0)
    phases = plan.phase_steps(batch_size)
    for name, first, _ in phases:
        if len(phases) > 1:
            ax.axvline(first, color="0.5", linewidth=0.6)
            ax.text(first, 0.98, f" {name}", va="top", fontsize=8, color="0.3")
    if inspected:
        ax.axvspan(1, inspected, color="0.92", label=f"inspected ({inspected} steps)")
    ax.plot([], [], color="0.3", linestyle="--", label="plan")
    ax.set(
        xlabel=f"step (global batch of {batch_size})",
        ylabel="share of samples (solid: so far in the phase; thin: per batch)",
        title=f"group shares over training, plan {plan.hash}",
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def inspect_mixture(
    plan: Plan, *, batch_size: int, steps: int, png: Path, lineage: Path | None = None, show: int = 12
) -> str:
    """Read the first `steps` batches through the stream; return the composition report."""
    stream = MixtureStream(plan, global_batch_size=batch_size, with_tokens=False)
    schedule = stream.schedule
    planned = group_counts(plan, schedule)
    steps = min(steps, len(planned))
    names = [g for g, _ in plan.groups]
    realised = np.zeros((steps, len(names)), dtype=np.int64)
    live = [p for p in plan.phase_plans() if p.total]
    phase_index = {p.name: i for i, p in enumerate(live)}
    per_phase = np.zeros((steps, len(live), len(names)), dtype=np.int64)  # items tallied by their phase
    out = open(lineage, "w", encoding="utf-8") if lineage else None  # noqa: SIM115 - closed below
    try:
        for k, batch in enumerate(stream):
            if k == steps:
                break
            for item in batch:
                realised[k, names.index(item["group"])] += 1
                per_phase[k, phase_index.get(item.get("phase"), 0), names.index(item["group"])] += 1
            if out:
                out.write(json.dumps({"step": k, "ids": [it["id"] for it in batch]}) + "\n")
    finally:
        if out:
            out.close()
    width = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"mixture {plan.spec.origin}: plan {plan.hash}, {plan.total:,} samples in {len(planned):,} global "
        f"batches of {batch_size}",
        "",
        "  step  " + "".join(n.rjust(width) for n in names),
    ]
    for k in range(min(steps, show)):
        lines.append(f"  {k:>4}  " + "".join(str(c).rjust(width) for c in realised[k]))
    if steps > show:
        lines.append(f"  {'...':>4}  ({steps - show} more)")
    seen = realised.sum()
    lines += ["", f"  first {steps} batches ({seen:,} samples): realised share vs planned"]
    sizes = planned[:steps].sum(axis=1)
    ideal = planned_shares(plan, schedule)[:steps] * sizes[:, None]
    # the bound holds per phase segment: each phase's part of a batch is within one sample of
    # that part's size x the phase's share of the group
    in_bound = np.ones(len(names), dtype=bool)
    for p, (first, seg) in enumerate(schedule.segments):
        rows = range(first, min(first + len(seg), steps))
        if not len(rows):
            continue
        share = np.array([n for _, n in live[p].groups], dtype=float) / live[p].total
        part = per_phase[rows.start : rows.stop, p]
        size = part.sum(axis=1, keepdims=True)
        in_bound &= (np.abs(part - size * share[None, :]) < 1).all(axis=0)
    for gi, (g, _) in enumerate(plan.groups):
        ok = bool(in_bound[gi])
        lines.append(
            f"    {g:<{width}} {realised[:, gi].sum() / max(1, seen):7.2%}  planned "
            f"{ideal[:, gi].sum() / max(1, sizes.sum()):7.2%}  "
            f"per batch {realised[:, gi].min()}..{realised[:, gi].max()} "
            f"({'within one sample of plan in every phase segment' if ok else 'OUTSIDE the per-batch bound'})"
        )
    same = np.array_equal(realised, planned[:steps])
    lines.append(f"  realised batches {'match' if same else 'DIFFER FROM'} the plan's schedule")
    plot_group_ratio(plan, schedule, png, inspected=steps)
    lines.append(f"  wrote {png}" + (f" and lineage {lineage}" if lineage else ""))
    return "\n".join(lines)

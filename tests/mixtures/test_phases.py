"""Mixtures in phases: property tests over random multi-phase plans (imaginary sources, exact
numbers), then the same plans' streams on real shards across ranks, workers and resumes.

Each random case draws 1-4 groups of 1-3 sources and 2-4 phases; a phase may leave groups out
and its length is rarely a multiple of the batch, so most phases start and end inside a batch.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.mixtures.helpers import fake_phased_plan
from vpit.mixtures.quota import segment_schedule
from vpit.mixtures.sampler import batch_slots, make_schedule, source_items

CASES = 120


def random_phased(rng: np.random.Generator, repeat: bool):
    sources = {
        f"g{g}": [(f"g{g}s{s}", int(rng.integers(1, 200))) for s in range(int(rng.integers(1, 4)))]
        for g in range(int(rng.integers(1, 5)))
    }
    names = {n: size for members in sources.values() for n, size in members}
    phases, left = [], dict(names)
    for _ in range(int(rng.integers(2, 5))):
        ph = {}
        for members in sources.values():
            if rng.random() < 0.25:
                continue  # this phase leaves the group out
            for n, _ in members:
                hi = 3 * names[n] if repeat else left[n] // 2
                if hi > 0:
                    ph[n] = int(rng.integers(0, hi + 1))
                    left[n] -= min(left[n], ph[n])
        if not sum(ph.values()):
            n = next(iter(names))
            ph[n] = 1
            left[n] = max(0, left[n] - 1)
        phases.append({n: c for n, c in ph.items() if c})
    if not repeat:  # drop draws past what exists (the last phases may have been optimistic)
        used = Counter()
        for ph in phases:
            for n in list(ph):
                ph[n] = min(ph[n], names[n] - used[n])
                used[n] += ph[n]
                if not ph[n]:
                    del ph[n]
        phases = [ph for ph in phases if ph] or [{next(iter(names)): 1}]
    return fake_phased_plan(sources, phases, seed=int(rng.integers(0, 2**31)))


def phase_draws(plan, schedule):
    """Per phase with samples: [(batch, source, draw)] of the slots the schedule tags with it
    (`Schedule.slot_phases`, what the stream names each item's phase by)."""
    out = [[] for p in plan.phase_plans() if p.total]
    for k in range(schedule.num_batches):
        src, draw = batch_slots(plan, schedule, k)
        for p, s, d in zip(schedule.slot_phases(k, src, draw).tolist(), src.tolist(), draw.tolist(), strict=True):
            out[p].append((k, s, d))
    return out


@pytest.mark.parametrize("case", range(CASES))
def test_random_phased_plans_keep_every_promise_per_phase(case):
    rng = np.random.default_rng(7000 + case)
    plan = random_phased(rng, repeat=case % 3 == 0)
    batch = int(rng.integers(1, 48))
    schedule = make_schedule(plan, batch)
    phases = plan.phase_plans()
    per_phase = phase_draws(plan, schedule)
    names = [s.name for s in plan.sources]

    # the batches hold every phase's draws and nothing else
    seq = [(k, int(s), int(d)) for k in range(schedule.num_batches) for s, d in zip(*batch_slots(plan, schedule, k))]
    assert sorted(seq) == sorted(r for rows in per_phase for r in rows)
    assert len(seq) == plan.total

    start = 0
    for phase, rows, (first, seg) in zip(phases, per_phase, schedule.segments, strict=True):
        # exact totals per phase and per source
        got = Counter(names[s] for _, s, _ in rows)
        assert {n: got[n] for n in names} == dict(phase.counts), phase.name
        # per-batch bound within the phase, its boundary segments included: counted from the
        # slots tagged with the phase, batch by batch
        end = start + phase.total
        cuts = [start, *range((start // batch + 1) * batch, -(-end // batch) * batch, batch), end]
        sizes = np.diff(cuts)
        in_batch = Counter(k - first for k, _, _ in rows)
        assert first == start // batch and (seg.sum(axis=1) == sizes).all()
        assert [in_batch[j] for j in range(len(sizes))] == sizes.tolist()
        for g, n_g in phase.groups:
            members = {i for i, s in enumerate(plan.sources) if s.group == g}
            per_batch = Counter(k - first for k, s, _ in rows if s in members)
            counts = np.array([per_batch[j] for j in range(len(sizes))])
            ideal = sizes * n_g / phase.total
            assert (counts >= np.floor(ideal)).all() and (counts <= np.ceil(ideal)).all(), (phase.name, g)
            assert (np.abs(np.cumsum(counts) - np.cumsum(sizes) * n_g / phase.total) < 1).all()
        start = end

    # a source's draws continue over the phases: 0..count-1, each once, phase after phase
    for i, sp in enumerate(plan.sources):
        order = [d for rows in per_phase for _, s, d in sorted(rows) if s == i]
        assert sorted(order) == list(range(sp.count))
        bounds = [max([d for _, s, d in rows if s == i], default=-1) for rows in per_phase]
        lows = [min([d for _, s, d in rows if s == i], default=10**9) for rows in per_phase]
        for p in range(1, len(per_phase)):
            assert lows[p] > max(bounds[:p]), "a later phase drew before an earlier one"
    # no duplicates without repetition; with it, floor or ceil of count / size each
    for i, sp in enumerate(plan.sources):
        draws = np.array([d for _, s, d in seq if s == i], dtype=np.int64)
        items = Counter(source_items(plan.seed, sp.name, sp.available, draws).tolist())
        assert set(items.values()) <= {sp.count // sp.available, -(-sp.count // sp.available)}


@pytest.mark.parametrize("case", range(300))
def test_segment_schedules_for_any_segment_sizes(case):
    """The quota rule for segments of any sizes: in bound per segment and cumulatively (it checks
    itself and raises), for random counts, including groups that are whole or absent."""
    rng = np.random.default_rng(case)
    n = rng.integers(0, int(rng.choice([5, 60, 2000])), size=int(rng.integers(1, 7)))
    n[0] += 1
    total, sizes = int(n.sum()), []
    while sum(sizes) < total:
        sizes.append(min(int(rng.integers(1, 90)), total - sum(sizes)))
    out = segment_schedule(n.tolist(), sizes)
    assert out.sum(axis=0).tolist() == n.tolist() and out.sum(axis=1).tolist() == sizes
    ideal = np.asarray(sizes)[:, None] * n[None, :] / total
    assert (out >= np.floor(ideal)).all() and (out <= np.ceil(ideal)).all()
    assert (np.abs(np.cumsum(out, axis=0) - np.cumsum(ideal, axis=0)) < 1).all()


def test_a_phase_within_one_batch_and_a_batch_over_three_phases():
    plan = fake_phased_plan(
        {"u": [("a", 50)], "g": [("b", 50)]}, [{"a": 3, "b": 1}, {"b": 2}, {"a": 5, "b": 5}], seed=1
    )
    schedule = make_schedule(plan, 16)
    assert schedule.num_batches == 1
    assert [first for first, _ in schedule.segments] == [0, 0, 0]
    assert [seg.tolist() for _, seg in schedule.segments] == [[[3, 1]], [[0, 2]], [[5, 5]]]


# -- specs in phases, on real shards ---------------------------------------------------------

PHASED = """
seed: 3
cache: {fp}
sources:
  vqa: {{path: mix, group: understanding, kind: understanding}}
  chat: {{path: mix, group: understanding, kind: text}}
  pairs: {{path: mix, group: generation, kind: generation}}
  edits: {{path: mix, group: editing, kind: editing}}
phases:
  - name: warm
    groups: {{understanding: 10, generation: 7, editing: 0}}
  - name: main
    total: 30
    groups: {{understanding: {{weight: 2}}, generation: {{weight: 1}}, editing: {{weight: 1, split: equal}}}}
  - groups: {{understanding: 9, editing: 3}}
"""
B = 8


@pytest.fixture(scope="module")
def phased(mix_data):
    from vpit.mixtures import load_spec, make_plan

    path = mix_data["root"] / "phased.yaml"
    path.write_text(PHASED.format(fp=mix_data["fingerprint"]))
    return path, make_plan(load_spec(path))


def test_a_spec_in_phases_plans_exact_counts_per_phase(phased):
    _, plan = phased
    assert [p.name for p in plan.phases] == ["warm", "main", "phase3"]
    assert [dict(p.groups) for p in plan.phases] == [
        {"understanding": 10, "generation": 7, "editing": 0},
        {"understanding": 15, "generation": 8, "editing": 7},
        {"understanding": 9, "generation": 0, "editing": 3},
    ]
    assert dict(plan.groups) == {"understanding": 34, "generation": 15, "editing": 10}
    assert plan.counts["edits"] == 10  # every editing sample once over two phases, none twice


def _steps(plan, world_size, workers, state=None):
    return [[(it["index"], it["id"]) for it in step] for step in _items(plan, world_size, workers, state)]


def _items(plan, world_size, workers, state=None):
    import torch

    from vpit.mixtures import MixtureStream

    per_rank = []
    for rank in range(world_size):
        stream = MixtureStream(plan, global_batch_size=B, rank=rank, world_size=world_size, with_tokens=False)
        if state is not None:
            stream.load_state_dict(state)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)
        per_rank.append(list(loader))
    return [[it for r in per_rank for it in r[k]] for k in range(len(per_rank[0]))]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_phased_streams_are_the_same_for_any_ranks_and_workers_and_resume_anywhere(phased):
    _, plan = phased
    reference = _steps(plan, 1, 0)
    ids = [i for step in reference for _, i in step]
    assert len(ids) == plan.total == 59 and len(set(ids)) == 59  # no repetition asked, none made
    for world_size in (1, 2, 4):
        for workers in (0, 1, 3):
            assert _steps(plan, world_size, workers) == reference, (world_size, workers)
    # every item names its phase; per phase, the groups come to the planned counts exactly
    items = [it for step in _items(plan, 2, 1) for it in step]
    for phase in plan.phases:
        got = Counter(it["group"] for it in items if it["phase"] == phase.name)
        assert {g: got[g] for g, _ in phase.groups} == dict(phase.groups), phase.name
    # resume at a step inside each phase (ends at 17, 47, 59: batches 2, 5 and 7 straddle) onto
    # another world size
    for k, (world_size, workers) in zip((1, 3, 6, 2, 5), ((2, 1), (4, 0), (1, 3), (4, 3), (1, 0)), strict=True):
        state = {"consumed": k * B, "plan_hash": plan.hash, "global_batch_size": B}
        assert _steps(plan, world_size, workers, state) == reference[k:], k


def test_phase_errors_name_the_phase_and_the_field(mix_data):
    from vpit.mixtures import load_spec, make_plan

    bad = mix_data["root"] / "bad_phases.yaml"
    text = PHASED.format(fp="null").replace("    total: 30\n", "")
    bad.write_text(text)
    with pytest.raises(ValueError, match="phases.main.total: groups give weights but the phase has no total"):
        load_spec(bad)
    bad.write_text(text + "groups: {understanding: 3}\n")
    with pytest.raises(ValueError, match="groups: a spec with phases gives its amounts in each phase"):
        load_spec(bad)

    over = mix_data["root"] / "over_phases.yaml"
    over.write_text(PHASED.format(fp="null").replace("editing: 3}", "editing: 4}"))
    with pytest.raises(
        ValueError, match=r"source edits \(group editing\) is drawn 11 times \(7 in main, 4 in phase3\)"
    ):
        make_plan(load_spec(over))


def test_a_grid_can_override_one_phase_by_name_or_position(phased):
    from vpit.mixtures import load_spec, make_plan

    path, plan = phased
    a = make_plan(load_spec(path, {"phases.main.groups.generation.weight": 2}))
    b = make_plan(load_spec(path, {"phases.1.groups.generation": {"weight": 2}}))
    assert [dict(p.groups) for p in a.phases] == [dict(p.groups) for p in b.phases]
    assert dict(a.phases[1].groups)["generation"] == 12 and a.phases[0] == plan.phases[0]
    c = make_plan(load_spec(path, {"phases.warm.groups.generation": 5}))
    assert dict(c.phases[0].groups)["generation"] == 5 and c.hash != plan.hash
    with pytest.raises(ValueError, match="no phase 'late'"):
        load_spec(path, {"phases.late.total": 4})


def test_a_source_split_over_phases_is_rounded_once_not_per_phase(mix_data):
    """Two sources of one group split equally over four phases of 5: rounding each phase alone gave
    the first source the extra sample every time (12 draws of its 10 samples: refused, though the
    spec asks for exactly 10 of each); the split carries its rounding from phase to phase."""
    from vpit.mixtures import load_spec, make_plan

    path = mix_data["root"] / "carry.yaml"
    path.write_text("""
sources:
  a: {path: extra, group: g}
  b: {path: mix, group: g, kind: generation}
phases:
  - {name: p1, groups: {g: {count: 5, split: equal}}}
  - {name: p2, groups: {g: {count: 5, split: equal}}}
  - {name: p3, groups: {g: {count: 5, split: equal}}}
  - {name: p4, groups: {g: {count: 5, split: equal}}}
""")
    plan = make_plan(load_spec(path))  # extra: 10 samples, mix: 20 generation samples
    assert plan.counts == {"a": 10, "b": 10}
    assert [dict(p.counts)["a"] for p in plan.phases] == [3, 2, 3, 2]


def test_a_group_given_0_in_every_phase_is_a_group_that_draws_nothing(mix_data, tmp_path):
    """A grid may sweep a phase's amount down to 0: the group stays known, draws none, and the
    stream, the table and a saved plan carry it."""
    from vpit.mixtures import MixtureStream, load_spec, make_plan
    from vpit.mixtures.plan import load_plan, save_plan

    path = mix_data["root"] / "zero.yaml"
    path.write_text(
        PHASED.format(fp="null")
        .replace("editing: 3}", "editing: 0}")
        .replace("editing: {{weight: 1, split: equal}}".replace("{{", "{").replace("}}", "}"), "editing: 0")
    )
    spec = load_spec(path)
    assert "editing" in spec.group_names
    plan = make_plan(spec)
    assert dict(plan.groups)["editing"] == 0 and plan.counts["edits"] == 0
    items = [it for batch in MixtureStream(plan, global_batch_size=B, with_tokens=False) for it in batch]
    assert len(items) == plan.total and not [it for it in items if it["group"] == "editing"]
    assert "editing" in plan.table(B)
    again = load_plan(save_plan(plan, tmp_path / "plan"), spec)
    assert again.phases == plan.phases and again.hash == plan.hash


def test_phase_field_errors_name_the_path_once(mix_data):
    from vpit.mixtures import load_spec

    bad = mix_data["root"] / "neg.yaml"
    bad.write_text(PHASED.format(fp="null").replace("understanding: 9,", "understanding: -3,"))
    with pytest.raises(ValueError) as e:
        load_spec(bad)
    assert "phases.phase3.groups.understanding.count: " in str(e.value) and "phases.phase3.phases" not in str(e.value)
    bad.write_text(PHASED.format(fp="null").replace("understanding: 9,", "understanding: {count: 4, weight: 0},"))
    with pytest.raises(ValueError, match="phases.phase3.groups.understanding: give exactly one of count or weight"):
        load_spec(bad)


def test_inspect_checks_every_phase_segment_and_plan_draws_the_steps(phased, tmp_path):
    """`vpit mix inspect` tallies items by their phase and checks each phase's part of every batch
    (the batches at the boundaries hold two); `vpit mix plan --batch-size` shows each phase's steps
    and writes the share plot."""
    from vpit.mixtures.inspect import inspect_mixture

    _, plan = phased
    report = inspect_mixture(plan, batch_size=B, steps=8, png=tmp_path / "shares.png")
    assert report.count("within one sample of plan in every phase segment") == 3, report
    assert "realised batches match the plan's schedule" in report
    assert (tmp_path / "shares.png").stat().st_size > 10_000
    assert plan.phase_steps(B) == [("warm", 1, 3), ("main", 3, 6), ("phase3", 6, 8)]
    table = plan.table(B)
    assert "phases (steps of a global batch of 8):" in table and "warm" in table and "6-8" in table

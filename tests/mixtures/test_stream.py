"""MixtureStream on real shards and real token caches: the same global sequence for any
number of ranks and DataLoader workers, resume onto another world size, tokens from the cache."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.mixtures.conftest import spec_text
from vpit.mixtures import MixtureStream, load_spec, make_plan
from vpit.mixtures.sampler import make_schedule, sample_at
from vpit.pipelines.token_cache import TokenCache

B = 8
# 3 workers on this 2-core machine is on purpose: the worker count must not matter.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def plan(mix_data):
    path = mix_data["root"] / "stream.yaml"
    path.write_text(spec_text(mix_data["fingerprint"], und=30, gen=30, edit=12, seed=7, repetition="allow"))
    return make_plan(load_spec(path))


def _steps(plan, world_size: int, workers: int, state: dict | None = None) -> list[list[dict]]:
    """Global batches as the ranks see them: each step's rank slices concatenated in rank order."""
    per_rank = []
    for rank in range(world_size):
        stream = MixtureStream(plan, global_batch_size=B, rank=rank, world_size=world_size)
        if state is not None:
            stream.load_state_dict(state)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)
        per_rank.append(list(loader))
    assert len({len(r) for r in per_rank}) == 1
    return [sum((r[k] for r in per_rank), []) for k in range(len(per_rank[0]))]


def _ids(steps):
    return [[(it["index"], it["id"]) for it in step] for step in steps]


def test_items_carry_record_and_cached_tokens(plan, mix_data):
    steps = _steps(plan, 1, 0)
    caches = {s.name: TokenCache(s.catalog.root, mix_data["fingerprint"]) for s in plan.sources}
    assert [it["index"] for step in steps for it in step] == list(range(plan.total))
    for item in (it for step in steps for it in step):
        rec = item["record"]
        assert item["id"] == rec["id"] and item["group"] == next(
            s.group for s in plan.sources if s.name == item["source"]
        )
        tok = item["tokens"]
        assert tok.dtype == np.float32 and tok.shape == (len(rec["images"]), 4, caches[item["source"]].dim)
    # the tokens are the cache's own rows for the sample the pure sampler names at that index
    schedule = make_schedule(plan, B)
    for item in (steps[1][3], steps[-1][0]):
        name, shard, pos = sample_at(plan, schedule, item["index"])
        assert name == item["source"]
        np.testing.assert_array_equal(item["tokens"], caches[name].tokens(shard, pos))
    assert any(len(it["tokens"]) == 0 for step in steps for it in step)  # text-only samples: (0, m, d)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_same_global_sequence_for_any_ranks_and_workers(plan, world_size, workers):
    reference = _ids(_steps(plan, 1, 0))
    assert _ids(_steps(plan, world_size, workers)) == reference
    flat = [i for step in reference for i in step]
    assert len({i for i, _ in flat}) == plan.total  # every global index once: no duplicates, no loss


def test_resume_at_random_step_onto_other_world_sizes(plan):
    reference = _ids(_steps(plan, 1, 0))
    rng = np.random.default_rng(11)
    for _ in range(3):
        k = int(rng.integers(1, len(reference)))
        first = MixtureStream(plan, global_batch_size=B, rank=0, world_size=2)
        it = iter(first)
        for _ in range(k):
            next(it)
        it.close()
        state = first.state_dict()
        assert state["consumed"] == k * B and state["plan_hash"] == plan.hash
        for world_size, workers in ((1, 0), (4, 3), (2, 1)):
            assert _ids(_steps(plan, world_size, workers, state=dict(state))) == reference[k:]


def test_loader_keeps_state_with_workers(plan):
    stream = MixtureStream(plan, global_batch_size=B, rank=1, world_size=2)
    got = []
    for step, batch in enumerate(stream.loader(num_workers=2)):
        got.append(batch)
        if step == 4:
            break
    assert stream.state_dict()["consumed"] == 5 * B
    resumed = MixtureStream(plan, global_batch_size=B, rank=1, world_size=2)
    resumed.load_state_dict(stream.state_dict())
    whole = list(MixtureStream(plan, global_batch_size=B, rank=1, world_size=2, with_tokens=False))
    assert [[i["id"] for i in b] for b in resumed] == [[i["id"] for i in b] for b in whole[5:]]


def test_load_state_dict_refuses_what_would_change_the_sequence(plan):
    stream = MixtureStream(plan, global_batch_size=B)
    with pytest.raises(ValueError, match="plan_hash: the checkpoint was made with plan abc"):
        stream.load_state_dict({"consumed": 8, "plan_hash": "abc"})
    with pytest.raises(ValueError, match="global_batch_size: the checkpoint used 16"):
        stream.load_state_dict({"consumed": 16, "plan_hash": plan.hash, "global_batch_size": 16})
    with pytest.raises(ValueError, match="consumed: 5 is not at a global batch boundary"):
        stream.load_state_dict({"consumed": 5, "plan_hash": plan.hash})


def test_no_tokens_without_a_cache(mix_data):
    path = mix_data["root"] / "nocache.yaml"
    path.write_text(spec_text(None))
    plan = make_plan(load_spec(path))
    with pytest.raises(ValueError, match="cache: .* names no token cache"):
        MixtureStream(plan, global_batch_size=4)
    items = [it for b in MixtureStream(plan, global_batch_size=4, with_tokens=False) for it in b]
    assert "tokens" not in items[0] and Counter(it["group"] for it in items) == {
        "understanding": 30,
        "generation": 16,
        "editing": 6,
    }


@pytest.mark.parametrize("case", range(12))
def test_random_specs_on_real_shards(mix_data, case):
    """Random amounts, seeds, batch sizes and world sizes over the real shards: exact per-source
    counts, the per-batch bound, no duplicates beyond planned repetition, and resume at a
    random step onto another world size continuing the identical sequence."""
    rng = np.random.default_rng(case)
    allow = bool(rng.random() < 0.5)
    amounts = {
        "und": int(rng.integers(1, 100 if allow else 50)),
        "gen": int(rng.integers(1, 45 if allow else 21)),
        "edit": int(rng.integers(1, 25 if allow else 11)),
    }
    path = mix_data["root"] / f"random{case}.yaml"
    path.write_text(
        spec_text(
            mix_data["fingerprint"],
            **amounts,
            seed=int(rng.integers(0, 1000)),
            repetition="allow" if allow else "error",
        )
    )
    plan = make_plan(load_spec(path))
    batch = int(rng.integers(4, 17))
    world = int(rng.choice([1, 2, 4]))

    def run(world_size, state=None):
        streams = [
            MixtureStream(
                plan,
                global_batch_size=batch,
                rank=r,
                world_size=world_size,
                with_tokens=False,
                prefetch_batches=int(rng.integers(1, 5)),
            )
            for r in range(world_size)
        ]
        for s in streams:
            if state:
                s.load_state_dict(state)
        return [sum(parts, []) for parts in zip(*[list(s) for s in streams], strict=True)]

    steps = run(world)
    items = [it for step in steps for it in step]
    assert [it["index"] for it in items] == list(range(plan.total))
    assert Counter(it["source"] for it in items) == {s.name: s.count for s in plan.sources if s.count}
    for step in steps:
        got = Counter(it["group"] for it in step)
        for g, n_g in plan.groups:
            ideal = len(step) * n_g / plan.total
            assert np.floor(ideal) <= got[g] <= np.ceil(ideal)
    for sp in plan.sources:
        times = Counter(it["id"] for it in items if it["source"] == sp.name)
        assert set(times.values()) <= {sp.count // sp.available, -(-sp.count // sp.available)}
        assert len(times) == min(sp.count, sp.available)
        assert all(it["record"]["kind"] == sp.kind for it in items if it["source"] == sp.name)
    k = int(rng.integers(0, len(steps)))
    other = int(rng.choice([w for w in (1, 2, 4) if w != world]))
    state = {"consumed": k * batch, "plan_hash": plan.hash, "global_batch_size": batch}
    assert _ids(run(other, state)) == _ids(steps[k:])


@pytest.mark.parametrize("world_size, micro", [(1, 4), (2, 2), (4, 1), (2, 1)])
def test_balanced_bins_hold_the_same_global_batch_for_any_split(plan, world_size, micro):
    """With `balance`, a global batch is dealt to (rank, micro step) bins of equal estimated tokens
    instead of contiguous slices: the union over ranks is still exactly the global batch, and the
    same bins (world x micro) give every rank the same items whatever the world size."""
    reference = _ids(_steps(plan, 1, 0))
    per_rank = []
    for rank in range(world_size):
        stream = MixtureStream(
            plan, global_batch_size=B, rank=rank, world_size=world_size, micro_batches=micro, balance=True
        )
        per_rank.append(list(stream))
    for k, ref in enumerate(reference):
        got = [(it["index"], it["id"]) for r in per_rank for it in r[k]]
        assert sorted(got) == sorted(ref)  # no duplicate, no loss
        assert all(0 <= it.get("micro", 0) < micro for r in per_rank for it in r[k])
    if world_size * micro == 4:  # the same 4 bins as one rank with 4 micro steps: the same items in each

        def bins(world, m):
            out = {}
            for rank in range(world):
                stream = MixtureStream(
                    plan, global_batch_size=B, rank=rank, world_size=world, micro_batches=m, balance=True
                )
                for k, step in enumerate(stream):
                    out.update({it["index"]: (k, rank * m + it.get("micro", 0)) for it in step})
            return out

        assert bins(world_size, micro) == bins(1, 4)


def test_token_balancing_bounds_the_slowest_rank_where_contiguous_slices_do_not():
    """Defect 7, the simulation: a 70/30 VQA/generation mix (hundreds of text tokens vs 64 visual
    tokens and a few words) dealt to 64 ranks. Contiguous slices leave the slowest rank 1.4-3.2x
    the mean load; LPT bins stay within one sample of each other."""
    from vpit.mixtures.sampler import balance_bins

    rng = np.random.default_rng(0)
    ranks, per_rank = 64, 4
    worst_slices, worst_bins = [], []
    for _ in range(20):
        n = ranks * per_rank
        vqa = rng.random(n) < 0.7
        cost = np.where(vqa, rng.integers(150, 1200, n), rng.integers(70, 90, n))
        slices = cost.reshape(ranks, per_rank).sum(1)
        worst_slices.append(slices.max() / slices.mean())
        where = balance_bins(cost, ranks)
        loads = np.bincount(where, weights=cost, minlength=ranks)
        assert sorted(np.flatnonzero(where == where[0]).tolist()) == np.flatnonzero(where == where[0]).tolist()
        assert loads.max() - loads.min() <= cost.max()
        worst_bins.append(loads.max() / loads.mean())
    assert min(worst_slices) > 1.4
    assert max(worst_bins) < 1.1, max(worst_bins)
    # a pure function of the costs: every rank computes the same assignment
    assert np.array_equal(balance_bins(cost, ranks), balance_bins(cost.copy(), ranks))


def test_a_saved_plan_gives_the_sequence_of_planning_in_every_worker(plan, mix_data, tmp_path):
    """Plan once: the file every rank and worker maps gives the same global sequence, and loading
    it reads no manifest, catalog or shard index (the datasets' indexes are hidden meanwhile)."""
    from vpit.mixtures.plan import load_plan, save_plan

    save_plan(plan, tmp_path / "plan")
    hidden = []
    for p in sorted((mix_data["mix"]).rglob("*.idx.*")) + [mix_data["mix"] / "manifest.json"]:
        p.rename(p.with_name(p.name + ".hidden"))
        hidden.append(p)
    try:
        loaded = load_plan(tmp_path / "plan", plan.spec)
    finally:
        for p in hidden:
            p.with_name(p.name + ".hidden").rename(p)
    assert loaded.hash == plan.hash and loaded.counts == plan.counts
    assert any(isinstance(s.catalog.picks, np.memmap) for s in loaded.sources)  # kind filters: mapped
    assert _ids(_steps(loaded, 2, 3)) == _ids(_steps(plan, 1, 0))
    with pytest.raises(Exception, match="made for another spec"):
        load_plan(tmp_path / "plan", load_spec_text(mix_data, seed=8))


def load_spec_text(mix_data, seed):
    path = mix_data["root"] / f"other-{seed}.yaml"
    path.write_text(spec_text(mix_data["fingerprint"], und=30, gen=30, edit=12, seed=seed, repetition="allow"))
    return load_spec(path)

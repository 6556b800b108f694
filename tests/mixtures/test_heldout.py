"""The held-out split: chosen by id hash, never streamed, the same for every seed and cell."""

from __future__ import annotations

import pytest

from tests.mixtures.conftest import spec_text
from vpit.mixtures import MixtureStream, heldout_items, load_spec, make_plan
from vpit.mixtures.catalog import build_catalog, is_heldout


def _spec(tmp, mix_data, heldout: float, seed: int = 0, und: int = 20, gen: int = 10):
    path = mix_data["root"] / f"heldout-{heldout}-{seed}-{und}-{gen}.yaml"
    path.write_text(spec_text(mix_data["fingerprint"], und=und, gen=gen, edit=4, seed=seed) + f"heldout: {heldout}\n")
    return load_spec(path)


def test_is_heldout_is_a_stable_fraction_of_ids():
    ids = [f"src:{i:09d}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 0.09 < len(held) / len(ids) < 0.11
    assert held == [i for i in ids if is_heldout(i, 0.1)]  # a pure function of the id
    assert set(i for i in ids if is_heldout(i, 0.05)) <= set(held)  # a larger split contains a smaller one
    assert not any(is_heldout(i, 0.0) for i in ids[:100])


def test_stream_never_yields_heldout_and_heldout_items_are_the_rest(tmp_path, mix_data):
    spec = _spec(tmp_path, mix_data, 0.25)
    plan = make_plan(spec)
    streamed = {item["id"] for batch in MixtureStream(plan, global_batch_size=6) for item in batch}
    held = heldout_items(spec)
    held_ids = {item["id"] for item in held}
    assert held_ids and not streamed & held_ids
    assert all(is_heldout(i, 0.25) for i in held_ids) and not any(is_heldout(i, 0.25) for i in streamed)
    # every held-out sample of every source's kind is there, with its cached tokens
    for s in spec.sources:
        full = build_catalog(s.path, s.kind, "t")
        shards, positions = full.locate(range(full.size))
        from vpit.mixtures.catalog import RecordReader

        reader = RecordReader(full.root, full.shard_names)
        ids = {reader.record(a, b)["id"] for a, b in zip(shards.tolist(), positions.tolist())}
        assert {i["id"] for i in held if i["source"] == s.name} == {i for i in ids if is_heldout(i, 0.25)}
    assert all(item["tokens"].shape[0] == len(item["record"]["images"]) for item in held)


def test_heldout_split_is_the_same_for_every_seed_and_amount(tmp_path, mix_data):
    a = {i["id"] for i in heldout_items(_spec(tmp_path, mix_data, 0.2, seed=0, und=20))}
    b = {i["id"] for i in heldout_items(_spec(tmp_path, mix_data, 0.2, seed=5, und=12, gen=6))}
    assert a == b
    sources_with_heldout = {i["source"] for i in heldout_items(_spec(tmp_path, mix_data, 0.2))}
    one_each = heldout_items(_spec(tmp_path, mix_data, 0.2), max_per_source=1)
    assert sorted(i["source"] for i in one_each) == sorted(sources_with_heldout) and len(one_each) >= 3


def test_heldout_shrinks_what_is_available(tmp_path, mix_data):
    with pytest.raises(ValueError, match=r"groups.generation.count: group generation asks for 20 samples"):
        make_plan(_spec(tmp_path, mix_data, 0.5, gen=20))  # 20 generation samples exist, about half are held out
    path = mix_data["root"] / "bad-heldout.yaml"
    path.write_text(spec_text(None) + "heldout: 1.5\n")
    with pytest.raises(
        ValueError, match=r"heldout: expected a fraction in \[0, 1\), e.g. 0.02 or \{fraction: 0.02\}, got 1.5"
    ):
        load_spec(path)
